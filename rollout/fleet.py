"""The local fleet: N real agent processes, each on its own loopback address.

`up` starts `python -m rollout agent` N times (127.0.0.2, 127.0.0.3, ... by default; any
127.0.0.0/8 base), each with its own state dir under WORKDIR/nodes/<id>, booted on the
given image, and writes WORKDIR/inventory.yaml, WORKDIR/token (0600) and WORKDIR/fleet.json
(the pids). It returns once every agent answers /healthz, and stops everything it started
if one does not. `down` stops the agents (each stops its own workload) and then makes sure
no process with its working directory inside WORKDIR is left.

With `tls`, `up` first makes a private CA in-process (rollout.certs, with the
`cryptography` package; no openssl command): WORKDIR/ca.pem and ca-key.pem (0600), and for
each node WORKDIR/nodes/<id>/tls.pem and tls-key.pem (0600), a certificate signed by that
CA whose IP subjectAltName is the node's address. The agents serve HTTPS with them and the
inventory says `ca_file: ca.pem`. Every `up` makes a new CA, as it makes a new token.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rollout import certs
from rollout.errors import InputError
from rollout.image import load_image
from rollout.inventory import dump_inventory
from rollout.model import Node
from rollout.tls import client_context

FLEET_FILE = "fleet.json"
INVENTORY = "inventory.yaml"
TOKEN = "token"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
NODE_CERT = "tls.pem"
NODE_KEY = "tls-key.pem"


@dataclass(frozen=True)
class FleetOptions:
    nodes: int = 12
    base_address: str = "127.0.0.2"
    agent_port: int = 7000
    workload_port: int = 8080
    racks: int = 3
    firmware_delay: float = 0.6
    kernel_delay: float = 0.3
    commit_deadline: float = 300.0
    ready_timeout: float = 30.0
    tls: bool = False  # agents serve HTTPS with certificates from a private CA
    trusted_keys: tuple[str, ...] = ()  # public keys the agents require signatures by


def _addresses(base: str, count: int) -> list[str]:
    try:
        first = ipaddress.IPv4Address(base)
    except ValueError:
        raise InputError(f"--base-address: {base!r} is not an IPv4 address") from None
    if not first.is_loopback:
        raise InputError(f"--base-address: {base} is not in 127.0.0.0/8; local nodes are loopback")
    last = first + (count - 1)
    if not last.is_loopback:
        raise InputError(f"--base-address: {count} nodes from {base} leave 127.0.0.0/8")
    return [str(first + i) for i in range(count)]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def up(workdir: str | os.PathLike[str], image_path: str, opts: FleetOptions) -> Path:
    """Start the fleet; return the inventory path."""
    if opts.nodes < 1:
        raise InputError(f"--nodes: expected at least 1, got {opts.nodes}")
    image = load_image(image_path)
    wd = Path(workdir).resolve()
    if (wd / FLEET_FILE).exists() and _alive(_read_pids(wd)):
        raise InputError(
            f"{wd}: a fleet is already running here; stop it: rollout fleet down --workdir {wd}"
        )
    hosts = _addresses(opts.base_address, opts.nodes)
    for host in hosts:
        for port in (opts.agent_port, opts.workload_port):
            if not _port_free(host, port):
                raise InputError(
                    f"{host}:{port} is already in use (another fleet still running?); stop it "
                    "with `rollout fleet down --workdir DIR` or pick --base-address"
                )
    wd.mkdir(parents=True, exist_ok=True)
    token = wd / TOKEN
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    width = max(2, len(str(opts.nodes)))
    ids = [f"node-{i + 1:0{width}d}" for i in range(len(hosts))]
    for node_id in ids:
        (wd / "nodes" / node_id).mkdir(parents=True, exist_ok=True)
    tls: dict[str, list[str]] = {}  # node id -> agent flags; all made before any agent starts
    if opts.tls:
        authority = certs.make_ca()
        certs.write(authority, wd / CA_CERT, wd / CA_KEY)
        for node_id, host in zip(ids, hosts, strict=True):
            cert, key = wd / "nodes" / node_id / NODE_CERT, wd / "nodes" / node_id / NODE_KEY
            certs.write(certs.issue(authority, host), cert, key)
            tls[node_id] = ["--tls-cert", str(cert), "--tls-key", str(key)]
    nodes: list[Node] = []
    procs: dict[str, int] = {}
    for i, (node_id, host) in enumerate(zip(ids, hosts, strict=True)):
        state = wd / "nodes" / node_id
        log = open(state / "agent.log", "ab")
        cmd = [
            sys.executable, "-m", "rollout", "agent",
            "--listen", f"{host}:{opts.agent_port}",
            "--state-dir", str(state),
            "--token-file", str(token),
            "--image", str(Path(image.path).resolve()),
            "--node-id", node_id,
            "--workload-port", str(opts.workload_port),
            "--firmware-delay", str(opts.firmware_delay),
            "--kernel-delay", str(opts.kernel_delay),
            "--commit-deadline", str(opts.commit_deadline),
            *tls.get(node_id, []),
            *[a for k in opts.trusted_keys for a in ("--trusted-key", str(Path(k).resolve()))],
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        procs[node_id] = proc.pid
        rack = f"rack-{i % opts.racks + 1}"
        ca = str(wd / CA_CERT) if opts.tls else None
        address = f"{host}:{opts.agent_port}"
        nodes.append(Node(node_id, address, {"rack": rack}, str(token), ca))
    (wd / FLEET_FILE).write_text(json.dumps({"pids": procs}, indent=2) + "\n")
    inventory = wd / INVENTORY
    dump_inventory(nodes, TOKEN, inventory, ca_file=CA_CERT if opts.tls else None)
    try:
        _wait_ready(nodes, opts.ready_timeout)
    except Exception:
        down(wd)
        raise
    return inventory


def _wait_ready(nodes: list[Node], timeout: float) -> None:
    contexts: dict[str, ssl.SSLContext] = {}
    targets: dict[str, tuple[str, ssl.SSLContext | None]] = {}
    for node in nodes:
        context = None
        if node.ca_file is not None:
            if node.ca_file not in contexts:
                contexts[node.ca_file] = client_context(node.ca_file)
            context = contexts[node.ca_file]
        targets[node.id] = (f"{node.scheme}://{node.address}/healthz", context)
    wait_healthz(targets, timeout, "agents", "see nodes/<id>/agent.log in the workdir")


def wait_healthz(
    targets: Mapping[str, tuple[str, ssl.SSLContext | None]],
    timeout: float,
    what: str,
    hint: str,
    *,
    interval: float = 0.1,
    alive: Callable[[str], str | None] = lambda _: None,
) -> None:
    """Poll each target's /healthz URL until all answer 200, within `timeout` seconds.

    Synchronous: callers may be inside an event loop (async tests) where asyncio.run is
    not allowed. `alive(name)` may return why a target can never answer (its process
    died), which ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    pending = dict(targets)
    while pending:
        for name, (url, context) in list(pending.items()):
            dead = alive(name)
            if dead is not None:
                raise RuntimeError(f"{name}: {dead}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as r:
                    if r.status == 200:
                        del pending[name]
            except (urllib.error.URLError, OSError):
                pass
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not answer within {timeout:g}s: {', '.join(sorted(pending))} ({hint})"
            )
        time.sleep(interval)  # polling interval, not a wait for an event


def _read_pids(wd: Path) -> dict[str, int]:
    try:
        data = json.loads((wd / FLEET_FILE).read_text())
        return {str(k): int(v) for k, v in data.get("pids", {}).items()}
    except (OSError, ValueError):
        return {}


def _alive(pids: dict[str, int]) -> bool:
    return any(pid_alive(p) for p in pids.values())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _processes_under(wd: Path) -> list[int]:
    """Pids of this fleet's processes still alive: agents (started with a `--state-dir`
    under WORKDIR/nodes) and workloads (running in a slot root under it). Nothing else,
    not even a shell whose working directory is inside the fleet's directory."""
    nodes = str(wd / "nodes") + os.sep
    slot_root = re.compile(re.escape(nodes) + r"[^/]+/slots/[^/]+/root(/|$)")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        state_dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--state-dir"]
        agent = "agent" in argv and any(d.startswith(nodes) for d in state_dirs)
        if (agent or slot_root.match(cwd)) and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def down(workdir: str | os.PathLike[str], timeout: float = 15.0) -> int:
    """Stop every process of the fleet in `workdir`; return how many agents were running."""
    wd = Path(workdir).resolve()
    if not (wd / FLEET_FILE).exists():
        raise InputError(f"{wd}: no {FLEET_FILE} here; is this a fleet's --workdir?")
    pids = _read_pids(wd)
    running = [p for p in pids.values() if pid_alive(p)]
    for pid in running:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for exit with a deadline
    for pid in running:
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
    for pid in _processes_under(wd):
        _signal_group(pid, signal.SIGKILL)
    (wd / FLEET_FILE).unlink(missing_ok=True)
    return len(running)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        _signal(pid, sig)
