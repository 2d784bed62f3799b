"""TLS on every API: real agent, `rollout run --listen` and `rollout serve` processes on
loopback, certificates from trustme (test CAs) or from `rollout fleet up --tls`
(rollout.certs, in-process; tests/test_certs.py tests those certificates themselves).

Verified when enabled, never skippable: the right CA works, plain HTTP to a TLS agent
fails, another CA is refused as a transport fault (the node is unreachable, the engine
does not crash), and the bearer token is still required over TLS.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from cryptography import x509

from rollout import fleet
from rollout.drivers.agent import AgentDriver
from rollout.drivers.base import Refused, TransportError
from rollout.errors import InputError
from rollout.inventory import dump_inventory, load_inventory, parse_inventory
from rollout.model import Node
from rollout.tls import client_context, optional_server_context
from tests.conftest import SampleImages, next_block, next_host
from tests.helpers import FAST_POLICY, ROOT, rollout, wait_for

TOKEN = "tls-test-token"


def write_pair(ca: trustme.CA, host: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for `host` (IP SAN) signed by `ca`, and its key, as PEM files."""
    issued = ca.issue_cert(host)
    cert, key = directory / f"{host}.pem", directory / f"{host}-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def wait_https(url: str, ca_file: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll `url` over verified HTTPS until it answers 200 (the process must stay up)."""
    context = client_context(ca_file)

    def answers() -> bool:
        assert proc.poll() is None, log.read_text()
        with urllib.request.urlopen(url, timeout=1, context=context) as r:
            return bool(r.status == 200)

    wait_for(answers, 20, what=f"{url} to answer 200", ignore=(OSError,))


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- inventory and contexts (no processes) ---------------------------------------------------
def test_inventory_ca_file_default_override_resolution_and_dump(tmp_path: Path) -> None:
    inv = parse_inventory(
        {
            "token_file": "token",
            "ca_file": "ca.pem",
            "nodes": [
                {"id": "a", "address": "127.0.0.2:7000"},
                {"id": "b", "address": "127.0.0.3:7000", "ca_file": "/etc/other-ca.pem"},
            ],
        },
        "inv.yaml",
        tmp_path,
    )
    a, b = inv.nodes
    assert a.ca_file == str(tmp_path / "ca.pem") and a.scheme == "https"
    assert b.ca_file == "/etc/other-ca.pem" and inv.ca_file == str(tmp_path / "ca.pem")
    plain = parse_inventory({"nodes": [{"id": "c", "address": "127.0.0.4:7000"}]}, "i", tmp_path)
    assert plain.nodes[0].ca_file is None and plain.nodes[0].scheme == "http"
    assert Node("x", "127.0.0.5:7000").ca_file is None  # positional constructors keep working

    path = tmp_path / "out.yaml"
    dump_inventory(inv.nodes, "token", path, ca_file="ca.pem")
    written = yaml.safe_load(path.read_text())
    assert written["ca_file"] == "ca.pem"
    assert "ca_file" not in written["nodes"][0]
    assert written["nodes"][1]["ca_file"] == "/etc/other-ca.pem"
    assert load_inventory(path).nodes == inv.nodes
    dump_inventory(inv.nodes[:1], "token", path)  # no default: the node carries its own
    assert load_inventory(path).nodes[0].ca_file == str(tmp_path / "ca.pem")

    with pytest.raises(InputError, match=r"nodes\[0\]\.ca_file"):
        parse_inventory({"nodes": [{"id": "a", "address": "h:1", "ca_file": ""}]}, "inv.yaml")


def test_bad_tls_files_are_input_errors(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert, key = write_pair(ca, "127.0.0.9", tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = write_pair(trustme.CA(), "127.0.0.9", tmp_path / "other")
    assert optional_server_context(cert, key) is not None
    with pytest.raises(InputError, match="--tls-key: needs --tls-cert too"):
        optional_server_context(None, key)
    with pytest.raises(InputError, match=r"--tls-cert .*missing\.pem: cannot read"):
        optional_server_context(tmp_path / "missing.pem", key)
    with pytest.raises(InputError, match="matching private key"):
        optional_server_context(cert, other_key)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(InputError, match="not a PEM CA certificate"):
        client_context(garbage)


# -- (a) the agent over HTTPS ----------------------------------------------------------------
@pytest.fixture
def tls_agent(tmp_path: Path, images: SampleImages) -> Iterator[tuple[str, Path, Path]]:
    """A real agent serving HTTPS with a trustme certificate: (address, ca.pem, workdir)."""
    ca = trustme.CA()
    host = next_host()
    cert, key = write_pair(ca, host, tmp_path)
    ca_file = write_ca(ca, tmp_path / "ca.pem")
    (tmp_path / "token").write_text(TOKEN + "\n")
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rollout", "agent", "--listen", f"{host}:7000",
             "--state-dir", str(tmp_path / "state"), "--token-file", str(tmp_path / "token"),
             "--image", images.v1.path, "--workload-port", "18080",
             "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        wait_https(f"https://{host}:7000/healthz", ca_file, proc, log)
        yield f"{host}:7000", ca_file, tmp_path
    finally:
        stop(proc)


async def test_driver_verifies_the_agent_certificate(
    tls_agent: tuple[str, Path, Path], tmp_path: Path
) -> None:
    address, ca_file, workdir = tls_agent
    token = str(workdir / "token")
    driver = AgentDriver(attempts=2, wait_max=0.1)
    try:
        good = Node("n1", address, token_file=token, ca_file=str(ca_file))
        status = await driver.status(good)
        assert status.booted_version == "1.0.0" and status.committed

        plain = Node("n1", address, token_file=token)  # http:// to an HTTPS-only agent
        with pytest.raises(TransportError):
            await driver.status(plain)

        other_ca = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
        impostor = Node("n1", address, token_file=token, ca_file=str(other_ca))
        with pytest.raises(TransportError, match="TLS certificate verification failed"):
            await driver.status_retrying(impostor)

        wrong_token = tmp_path / "wrong-token"
        wrong_token.write_text("not-the-token\n")
        no_entry = Node("n1", address, token_file=str(wrong_token), ca_file=str(ca_file))
        with pytest.raises(Refused) as refused:
            await driver.status(no_entry)  # TLS does not replace the token
        assert refused.value.status == 401
    finally:
        await driver.close()


def test_run_against_an_agent_with_another_ca_fails_it_as_unreachable(
    tls_agent: tuple[str, Path, Path], images: SampleImages, tmp_path: Path
) -> None:
    address, _, workdir = tls_agent
    other_ca = write_ca(trustme.CA(), tmp_path / "other-ca.pem")
    inventory = tmp_path / "inventory.yaml"
    dump_inventory([Node("n1", address, token_file=str(workdir / "token"))], None, inventory,
                   ca_file=other_ca)  # fmt: skip
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(FAST_POLICY))
    proc = rollout("run", "--inventory", str(inventory), "--policy", str(policy),
                   "--image", images.v2.path, "--state", str(tmp_path / "state.db"),
                   "--output", "json", "--log-format", "json")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    node = json.loads(proc.stdout)["nodes"][0]
    assert node["reason"] == "unreachable", node
    assert "certificate verification failed" in node["detail"]
    assert "Traceback" not in proc.stderr


def test_agent_refuses_half_or_bad_tls_flags(tmp_path: Path, images: SampleImages) -> None:
    cert, key = write_pair(trustme.CA(), "127.0.0.9", tmp_path)
    (tmp_path / "token").write_text(TOKEN)
    base = ["agent", "--listen", f"{next_host()}:7000", "--state-dir", str(tmp_path / "s"),
            "--token-file", str(tmp_path / "token"), "--image", images.v1.path]  # fmt: skip
    half = rollout(*base, "--tls-cert", str(cert))
    assert half.returncode == 2 and "--tls-cert: needs --tls-key" in half.stderr
    missing = rollout(*base, "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(key))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    swapped = rollout(*base, "--tls-cert", str(key), "--tls-key", str(cert))
    assert swapped.returncode == 2 and "private key" in swapped.stderr


# -- (b) a TLS fleet, `rollout run --listen` over HTTPS, `rollout status` ---------------------
def test_run_over_a_tls_fleet_with_its_api_over_https(images: SampleImages, tmp_path: Path) -> None:
    workdir = tmp_path / "fleet"
    up = rollout("fleet", "up", "--tls", "--nodes", "2", "--workdir", str(workdir),
                 "--image", images.v1.path, "--base-address", next_block(2),
                 "--firmware-delay", "0.2", "--kernel-delay", "0.1")  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert "HTTPS" in up.stdout
        inventory = workdir / "inventory.yaml"
        assert yaml.safe_load(inventory.read_text())["ca_file"] == "ca.pem"
        for key in [workdir / "ca-key.pem", *workdir.glob("nodes/*/tls-key.pem")]:
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        nodes = load_inventory(inventory).nodes
        assert all(n.ca_file == str(workdir / "ca.pem") for n in nodes)
        plain = rollout("status", "--inventory", str(inventory), "--output", "json")
        assert plain.returncode == 0, plain.stderr

        # The controller API of this run, over HTTPS with its own (trustme) certificate.
        api_ca = trustme.CA()
        api_host = next_host()
        cert, key = write_pair(api_ca, api_host, tmp_path)
        api_ca_file = write_ca(api_ca, tmp_path / "api-ca.pem")
        (tmp_path / "api-token").write_text("run-api-token\n")
        policy = tmp_path / "policy.yaml"
        gates = [{"name": "ship-it", "kind": "approval", "after": "canary"}]
        policy.write_text(yaml.safe_dump(dict(FAST_POLICY, gates=gates)))
        log, output = tmp_path / "run.log", tmp_path / "run.json"
        with open(log, "wb") as err, open(output, "wb") as out:
            run = subprocess.Popen(
                [sys.executable, "-m", "rollout", "run", "--inventory", str(inventory),
                 "--policy", str(policy), "--image", images.v2.path,
                 "--state", str(tmp_path / "state.db"), "--log-format", "json",
                 "--output", "json", "--listen", f"{api_host}:7401",
                 "--token-file", str(tmp_path / "api-token"),
                 "--tls-cert", str(cert), "--tls-key", str(key)],
                stdout=out, stderr=err, cwd=ROOT,
            )  # fmt: skip
        try:
            wait_https(f"https://{api_host}:7401/healthz", api_ca_file, run, log)
            server = ["--server", f"https://{api_host}:7401",
                      "--token-file", str(tmp_path / "api-token")]  # fmt: skip
            unverified = rollout("ls", *server)
            assert unverified.returncode == 2 and "certificate" in unverified.stderr
            rid = _wait_for_gate([*server, "--ca-file", str(api_ca_file)])
            approved = rollout("approve", rid, "ship-it", "--by", "alice", *server,
                               "--ca-file", str(api_ca_file))  # fmt: skip
            assert approved.returncode == 0, approved.stderr
            assert run.wait(120) == 0, log.read_text()
        finally:
            stop(run)
        result = json.loads(output.read_text())
        assert result["phase"] == "succeeded"
        assert {n["reason"] for n in result["nodes"]} == {None}

        after = rollout("status", "--inventory", str(inventory), "--output", "json")
        assert after.returncode == 0, after.stderr
        rows = json.loads(after.stdout)["nodes"]
        assert {r["digest"] for r in rows} == {images.v2.digest}
        assert all(r["committed"] and r["boot_count"] == 2 and r["healthy"] for r in rows)
    finally:
        if (workdir / fleet.FLEET_FILE).exists():
            fleet.down(workdir)


def _wait_for_gate(server: list[str]) -> str:
    def listed() -> list[dict[str, Any]]:
        proc = rollout("ls", *server, "--output", "json")
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout)["rollouts"])

    rollouts = wait_for(listed, 60, 0.2, what="the rollout to wait on its gate",
                        done=lambda r: bool(r) and r[0]["phase"] == "waiting")  # fmt: skip
    return str(rollouts[0]["id"])


# -- (c) `rollout serve` over HTTPS and its clients --------------------------------------------
def test_serve_over_https_with_client_ca_file(images: SampleImages, tmp_path: Path) -> None:
    workdir = tmp_path / "fleet"
    opts = fleet.FleetOptions(nodes=1, base_address=next_block(1), firmware_delay=0.2,
                              kernel_delay=0.1, tls=True)  # fmt: skip
    inventory = fleet.up(workdir, images.v1.path, opts)
    ca = trustme.CA()
    host = next_host()
    cert, key = write_pair(ca, host, tmp_path)
    ca_file = write_ca(ca, tmp_path / "ctl-ca.pem")
    token = tmp_path / "ctl-token"
    token.write_text("ctl-secret\n")
    half = rollout("serve", "--state", str(tmp_path / "x.db"), "--listen", f"{host}:7400",
                   "--token-file", str(token), "--tls-key", str(key))  # fmt: skip
    assert half.returncode == 2 and "--tls-key: needs --tls-cert" in half.stderr
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "rollout", "serve", "--state", str(tmp_path / "ctl.db"),
             "--listen", f"{host}:7400", "--token-file", str(token), "--log-format", "json",
             "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROLLOUT_")}

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rollout", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=120, env=env | extra)  # fmt: skip

    try:
        wait_https(f"https://{host}:7400/healthz", ca_file, serve, log)
        url = f"https://{host}:7400"
        listed = cli("ls", "--server", url, "--token-file", str(token), "--ca-file", str(ca_file))
        assert listed.returncode == 0, listed.stderr
        assert "no rollouts" in listed.stdout

        unverified = cli("ls", "--server", url, "--token-file", str(token))
        assert unverified.returncode == 2
        assert "certificate" in unverified.stderr and "--ca-file" in unverified.stderr
        other = write_ca(trustme.CA(), tmp_path / "other.pem")
        wrong_ca = cli("ls", "--server", url, "--token-file", str(token), "--ca-file", str(other))
        assert wrong_ca.returncode == 2 and "certificate" in wrong_ca.stderr
        cleartext = cli("ls", "--server", f"http://{host}:7400", "--token-file", str(token),
                        ROLLOUT_CA_FILE=str(ca_file))  # fmt: skip
        assert cleartext.returncode == 2 and "not https://" in cleartext.stderr
        (tmp_path / "bad-token").write_text("nope\n")
        no_entry = cli("ls", "--server", url, "--token-file", str(tmp_path / "bad-token"),
                       "--ca-file", str(ca_file))  # fmt: skip
        assert no_entry.returncode == 2 and "401" in no_entry.stderr

        # A rollout over a TLS fleet, started and watched over HTTPS (env vars this time).
        policy = tmp_path / "policy.yaml"
        policy.write_text(yaml.safe_dump(FAST_POLICY))
        over_tls = {"ROLLOUT_SERVER": url, "ROLLOUT_TOKEN_FILE": str(token),
                    "ROLLOUT_CA_FILE": str(ca_file)}  # fmt: skip
        started = cli("start", "--inventory", str(inventory), "--policy", str(policy),
                      "--image", images.v2.path, **over_tls)  # fmt: skip
        assert started.returncode == 0, started.stderr
        watched = cli("watch", started.stdout.strip(), **over_tls)
        assert watched.returncode == 0, watched.stdout + watched.stderr + log.read_text()
        assert "rollout succeeded" in watched.stdout
    finally:
        stop(serve)
        fleet.down(workdir)


def test_fleet_tls_makes_its_certificates_without_the_openssl_command(
    images: SampleImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An `openssl` first on PATH that leaves a mark and fails: `up` must never run it.
    bin_dir, mark = tmp_path / "bin", tmp_path / "openssl-ran"
    bin_dir.mkdir()
    (bin_dir / "openssl").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (bin_dir / "openssl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    workdir = tmp_path / "fleet"
    host = next_block(1)
    opts = fleet.FleetOptions(nodes=1, base_address=host, tls=True)
    try:
        inventory = fleet.up(workdir, images.v1.path, opts)  # its agent answered over HTTPS
        assert not mark.exists()
        assert yaml.safe_load(inventory.read_text())["ca_file"] == "ca.pem"
        node = workdir / "nodes" / "node-01"
        for key in (workdir / "ca-key.pem", node / "tls-key.pem"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        ca = x509.load_pem_x509_certificate((workdir / "ca.pem").read_bytes())
        leaf = x509.load_pem_x509_certificate((node / "tls.pem").read_bytes())
        assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [host]
        assert list(workdir.rglob(".*.tmp")) == []  # no temporary file of the writes left
    finally:
        if (workdir / fleet.FLEET_FILE).exists():
            fleet.down(workdir)
