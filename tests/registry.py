"""Real OCI registries for tests: Debian's `docker-registry` (distribution 2.8) processes.

`RegistryFactory.start()` runs one on a fresh loopback address with, by default, TLS (a
certificate from a trustme CA shared by every registry the factory starts, with the
address as its IP subjectAltName) and htpasswd basic auth (bcrypt), its storage in a tmp
dir. Options: `auth="none"`, `auth="token"` (distribution's token auth, with a small token
service here that checks the same user and password and signs ES256 JWTs), `tls=False`,
`upstream=other` (a pull-through cache of another registry, with its credentials; the
upstream must use token auth or none: distribution's proxy only logs in to a token realm) and
`extra_hosts` (more IP SANs, e.g. for a proxy in front of it), `host`/`port` (e.g.
127.0.0.1, the address QEMU's user network shows guests as 10.0.2.2).

Readiness is the registry's own "listening on" log line, awaited with a deadline; its
output (access log included: one combined-format line per request, status and all) is
copied to `log` and kept in memory, and `wait_log(pattern)` waits for a line without
sleeping. Only the factory's own processes are ended, by PID, at teardown.

`CuttingProxy` forwards TCP to a registry from its own loopback address and cuts the
first connection whose response bytes pass a threshold: a transfer broken mid-body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import http.server
import json
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from rollout.oci import Credentials, Reference, RegistryClient
from rollout.tls import client_context
from tests.conftest import next_host

PORT = 5443
READY_DEADLINE = 30.0
PACKAGES = {"docker-registry": "docker-registry", "skopeo": "skopeo"}


def require(tool: str) -> str:
    """The path of a tool the OCI tests need; fail (not skip) naming its Debian package."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} not found: install the Debian package {PACKAGES[tool]} "
            f"(apt-get install {PACKAGES[tool]}; .ci/run does)",
            pytrace=False,
        )
    return path


class Registry:
    """One running docker-registry process and what a test needs to reach it."""

    def __init__(
        self,
        directory: Path,
        ca: trustme.CA,
        ca_pem: Path,
        *,
        auth: str,
        tls: bool,
        upstream: Registry | None,
        extra_hosts: tuple[str, ...],
        host: str | None = None,
        port: int = PORT,
    ) -> None:
        self.directory = directory
        self.host = host or next_host()
        self.address = f"{self.host}:{port}"
        self.tls = tls
        self.auth = auth
        self.ca_pem = ca_pem
        self.username = "rollout"
        self.password = secrets.token_urlsafe(12)
        self.log = directory / "registry.log"
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._token: TokenServer | None = None
        self.proc: subprocess.Popen[bytes] | None = None

        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(directory / "storage")},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.address, "secret": secrets.token_hex(16)},
            "health": {"storagedriver": {"enabled": False}},
        }
        if tls:
            issued = ca.issue_cert(self.host, *extra_hosts)
            cert, key = directory / "cert.pem", directory / "key.pem"
            cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
            issued.private_key_pem.write_to_path(str(key))
            config["http"]["tls"] = {"certificate": str(cert), "key": str(key)}
        if auth == "htpasswd":
            hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
            (directory / "htpasswd").write_text(f"{self.username}:{hashed}\n")
            config["auth"] = {
                "htpasswd": {"realm": "rollout-test", "path": str(directory / "htpasswd")}
            }
        elif auth == "token":
            self._token = TokenServer(ca, directory, self.username, self.password)
            config["auth"] = {
                "token": {
                    "realm": self._token.realm,
                    "service": TokenServer.SERVICE,
                    "issuer": TokenServer.ISSUER,
                    "rootcertbundle": str(self._token.bundle),
                }
            }
        elif auth != "none":
            raise ValueError(f"auth: htpasswd, token or none, not {auth!r}")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(directory)}
        if upstream is not None:
            if upstream.auth == "htpasswd":
                # distribution 2.8 keys a proxy's credentials by the upstream's token realm
                # (proxy/proxyauth.go): to basic auth it would send nothing at all.
                raise ValueError("a mirror's upstream needs auth='token' or 'none'")
            config["proxy"] = {
                "remoteurl": f"{'https' if upstream.tls else 'http'}://{upstream.address}",
                "username": upstream.username,
                "password": upstream.password,
            }
            env["SSL_CERT_FILE"] = str(upstream.ca_pem)  # Go's TLS trusts the test CA
        (directory / "config.yml").write_text(yaml.safe_dump(config))

        self.cert_dir = directory / "certs.d"  # skopeo --cert-dir: *.crt are CAs
        self.cert_dir.mkdir()
        shutil.copy(ca_pem, self.cert_dir / "ca.crt")
        self.authfile = directory / "auth.json"
        secret = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        self.authfile.write_text(json.dumps({"auths": {self.address: {"auth": secret}}}))

        self.proc = subprocess.Popen(
            [require("docker-registry"), "serve", str(directory / "config.yml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._reader = threading.Thread(target=self._copy_output, daemon=True)
        self._reader.start()
        try:
            self.wait_log(r"listening on", READY_DEADLINE)
        except BaseException:
            self.stop()
            raise

    # -- what tests use -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    @property
    def credentials(self) -> Credentials | None:
        return None if self.auth == "none" else Credentials(self.username, self.password)

    @property
    def creds_arg(self) -> str:
        """USER:PASSWORD for skopeo's --creds options."""
        return f"{self.username}:{self.password}"

    def ssl_context(self) -> ssl.SSLContext | bool:
        return client_context(self.ca_pem) if self.tls else True

    def ref(self, repository: str, tag: str | None = None, digest: str | None = None) -> Reference:
        return Reference(self.address, repository, tag, digest)

    def client(
        self, session: aiohttp.ClientSession, credentials: Credentials | bool | None = True
    ) -> RegistryClient:
        """A client for this registry: its credentials (True), others, or none (None)."""
        creds = self.credentials if credentials is True else None
        if isinstance(credentials, Credentials):
            creds = credentials
        return RegistryClient(
            session, credentials=creds, ssl=self.ssl_context(), plain_http=not self.tls
        )

    def access_log(self) -> list[str]:
        """The registry's access log so far: `"GET /v2/... HTTP/1.1" 206 ...` lines."""
        with self._changed:
            return [line for line in self.lines if re.search(r'^\S+ - \S+ \[.*" \d{3} ', line)]

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first output line matching `pattern`, waiting for it (the process must live)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                if self.proc is None or self._reader_done:
                    raise AssertionError(f"docker-registry exited:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line /{pattern}/ in {timeout}s:\n{self.output()}")
                self._changed.wait(left)

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        """End this registry's own process (by its PID) and its token service."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            self._reader.join(5)
        if self._token is not None:
            self._token.close()

    # -- plumbing -------------------------------------------------------------------------
    _reader_done = False

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log, "w") as out:
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                out.write(line + "\n")
                out.flush()
                with self._changed:
                    self.lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._reader_done = True
            self._changed.notify_all()


class RegistryFactory:
    """Starts registries that share one test CA; stops them all at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_pem = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.started: list[Registry] = []

    def start(
        self,
        *,
        auth: str = "htpasswd",
        tls: bool = True,
        upstream: Registry | None = None,
        extra_hosts: tuple[str, ...] = (),
        host: str | None = None,
        port: int = PORT,
    ) -> Registry:
        directory = self.directory / f"registry-{len(self.started)}"
        directory.mkdir()
        registry = Registry(
            directory,
            self.ca,
            self.ca_pem,
            auth=auth,
            tls=tls,
            upstream=upstream,
            extra_hosts=extra_hosts,
            host=host,
            port=port,
        )
        self.started.append(registry)
        return registry

    def close(self) -> None:
        for registry in reversed(self.started):
            registry.stop()


@contextlib.contextmanager
def registries(directory: Path) -> Iterator[RegistryFactory]:
    factory = RegistryFactory(directory)
    try:
        yield factory
    finally:
        factory.close()


# -- distribution's token auth -----------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A docker token service: Basic credentials in, an ES256 JWT the registry trusts out.

    The signing certificate is issued by the test CA and sent in the JWT's `x5c` header;
    the registry's `rootcertbundle` is that CA. Valid credentials get what they ask for;
    anything else gets 401.
    """

    SERVICE = "rollout-test-registry"
    ISSUER = "rollout-test-token-issuer"

    def __init__(self, ca: trustme.CA, directory: Path, username: str, password: str) -> None:
        self.username, self.password = username, password
        self.requests: list[dict[str, str]] = []  # query of each token request
        host = next_host()
        serving = ca.issue_cert(host)
        signing = ca.issue_cert("token-signer")
        self.bundle = directory / "token-ca.pem"
        ca.cert_pem.write_to_path(str(self.bundle))
        self._key = serialization.load_pem_private_key(signing.private_key_pem.bytes(), None)
        leaf = x509.load_pem_x509_certificate(signing.cert_chain_pems[0].bytes())
        self._x5c = base64.b64encode(leaf.public_bytes(serialization.Encoding.DER)).decode()

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert, key = directory / "token-cert.pem", directory / "token-key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in serving.cert_chain_pems))
        serving.private_key_pem.write_to_path(str(key))
        context.load_cert_chain(cert, key)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.realm = f"https://{host}:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        from urllib.parse import parse_qsl, urlsplit

        query = dict(parse_qsl(urlsplit(handler.path).query))
        self.requests.append(query)
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        if handler.headers.get("Authorization") != f"Basic {expected}":
            handler.send_response(401)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        access = []
        for scope in query.get("scope", "").split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        body = json.dumps({"token": self.sign(access), "expires_in": 300}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def sign(self, access: list[dict[str, Any]]) -> str:
        now = int(datetime.datetime.now(datetime.UTC).timestamp())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER,
            "sub": self.username,
            "aud": self.SERVICE,
            "exp": now + 300,
            "nbf": now - 30,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(
            self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


# -- faults ----------------------------------------------------------------------------------
class CuttingProxy:
    """TCP from its own loopback address to `target`, cutting ONE connection: the first
    whose bytes from the server pass `cut_after` is aborted there (both sides, at once).

    Use as `async with CuttingProxy(registry.address, cut_after=N, host=h) as proxy`; its
    `address` is "host:port". `cuts` counts the connections cut (0 or 1).
    """

    def __init__(self, target: str, *, cut_after: int, host: str | None = None) -> None:
        target_host, _, port = target.rpartition(":")
        self.target = (target_host, int(port))
        self.cut_after = cut_after
        self.host = host or next_host()
        self.cuts = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"{self.host}:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._tasks.discard(task)
            return
        up = asyncio.create_task(self._pump(reader, up_writer, down=False))
        cut = False
        try:
            cut = await self._pump(up_reader, writer, down=True)
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            if cut:  # a reset, not a clean end: the client sees the body broken off
                writer.transport.abort()
                up_writer.transport.abort()
            else:
                writer.close()
                up_writer.close()
            self._tasks.discard(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, down: bool
    ) -> bool:
        """Copy until EOF; True when this is the connection cut (after `cut_after` bytes)."""
        sent = 0
        try:
            while data := await src.read(1 << 16):
                if down and self.cuts == 0 and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    dst.write(data[: self.cut_after - sent])
                    await dst.drain()
                    return True
                sent += len(data)
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except OSError:
            pass
        return False
