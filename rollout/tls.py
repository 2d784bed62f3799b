"""TLS for every HTTP API of rollout: the agent's, the controller's, and their clients'.

TLS is optional and off by default; when it is on it is verified, and there is no
insecure mode. Two helpers build the standard-library contexts every side uses, so the
agent, `rollout serve`, `rollout run --listen`, the agent driver and the CLI client all
accept and refuse exactly the same things:

- `server_context(cert, key)`: a server context (TLS 1.2 or newer) holding a PEM
  certificate chain and its private key;
- `client_context(ca_file)`: a client context (TLS 1.2 or newer) that trusts only the
  CA certificates in `ca_file` and checks the peer's hostname (an IP address must be in
  the certificate's IP subjectAltName); `None` uses the system trust store.

Bad input (a missing, unreadable or malformed file, a key that does not match the
certificate) is an `InputError` naming the option and the file; the caller exits 2.
"""

from __future__ import annotations

import os
import ssl

import aiohttp

from rollout.errors import InputError

__all__ = ["certificate_problem", "client_context", "optional_server_context", "server_context"]


def _readable(option: str, path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise InputError(f"{option} {name}: cannot read: {exc.strerror}") from exc
    return name


def server_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    options: tuple[str, str] = ("--tls-cert", "--tls-key"),
) -> ssl.SSLContext:
    """A server-side context serving `cert` (PEM chain) with `key` (PEM private key)."""
    cert_path = _readable(options[0], cert)
    key_path = _readable(options[1], key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise InputError(
            f"{options[0]} {cert_path} / {options[1]} {key_path}: not a PEM certificate and "
            f"its matching private key ({exc.reason or exc})"
        ) from exc
    return ctx


def optional_server_context(
    cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None
) -> ssl.SSLContext | None:
    """`server_context` for --tls-cert/--tls-key given both or neither (None: plain HTTP).

    >>> optional_server_context(None, None) is None
    True
    >>> optional_server_context("cert.pem", None)
    Traceback (most recent call last):
    rollout.errors.InputError: --tls-cert: needs --tls-key too (both or neither)
    """
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise InputError(f"{given}: needs {missing} too (both or neither)")
    return server_context(cert, key)


def client_context(
    ca_file: str | os.PathLike[str] | None, option: str = "--ca-file"
) -> ssl.SSLContext:
    """A client-side context verifying servers against `ca_file` (PEM), or the system store.

    With a `ca_file` only its certificates are trusted, not the system store's.
    """
    path = None if ca_file is None else _readable(option, ca_file)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=path)
    except ssl.SSLError as exc:
        raise InputError(
            f"{option} {path}: not a PEM CA certificate ({exc.reason or exc})"
        ) from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def certificate_problem(exc: BaseException) -> str | None:
    """Why the peer's TLS certificate did not verify, when that is what `exc` (or what it
    wraps) is, e.g. "unable to get local issuer certificate"; else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, aiohttp.ClientConnectorCertificateError):
            current = current.certificate_error
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current)
        current = current.__cause__ or current.__context__
    return None
