"""A fleet of QEMU virtual machines running the disk backend: `rollout fleet up --vm`.

`up` makes (once, cached) the sample guest and its v1 root-filesystem image, and the base
disk with slot A written from it; then for each node a qcow2 overlay of that base with
its own data partition (agent.yaml with the node id, the fleet's token, the agent's
factory state: slot A good, booted, committed), and boots one QEMU per node. Each VM's
agent (7000) and workload (8080) ports are forwarded from its own loopback address
(127.0.0.20, .21, ... by default). It writes WORKDIR/inventory.yaml, WORKDIR/token and
WORKDIR/fleet.json (`{"kind": "vm", "vms": {id: {pid, disk, host, ...}}}`) and returns
once every agent answers /healthz.

`down` stops the VMs (SIGKILL of QEMU processes that are ours: each pid is checked to be
a QEMU running that node's disk). `power_cut` and `power_on` are the tests' and the
curious user's way to pull the plug on one node and start it again on the same disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import ssl
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

import rollout
from rollout.errors import InputError
from rollout.inventory import dump_inventory
from rollout.model import Node
from rollout.vm import disk, guest, qemu

FLEET_FILE = "fleet.json"
INVENTORY = "inventory.yaml"
TOKEN = "token"
DATA_TOKEN = "token"
AGENT_STATE = "agent"


@dataclass(frozen=True)
class VMFleetOptions:
    nodes: int = 2
    base_address: str = "127.0.0.20"
    racks: int = 2
    memory: int = qemu.MEMORY_MIB
    commit_deadline: float = 300.0
    ready_timeout: float = 300.0
    trusted_keys: tuple[str, ...] = ()  # public keys the agents require signatures by


def _code_key() -> str:
    """Hash of the rollout package's sources: a sample image carries the agent's code."""
    h = hashlib.sha256(guest._base_key().encode())
    root = Path(rollout.__file__).parent
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".cfg", ".typed"):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


# Builds kept in the cache: a sample image is 340 MB and a base disk about 0.5 GB on
# disk, and every change to the package's code makes a new set (a machine running CI
# for each commit filled 17 GB in a day). The newest few stay: a fleet or test session
# started from a checkout a few commits back still finds its files.
KEEP_BUILDS = 3


def stale(entries: list[tuple[str, str, float]], keep: int) -> list[str]:
    """Names of cached files to delete, given (name, build key, mtime) of each: those of
    every build but the `keep` most recently written (a build's time is its newest file's).

    >>> stale([("a1", "k1", 1.0), ("a2", "k2", 2.0), ("a3", "k3", 3.0), ("b1", "k3", 0.5)], 2)
    ['a1']
    >>> stale([("a1", "k1", 1.0)], 1), stale([("a1", "k1", 1.0), ("a2", "k2", 2.0)], 0)
    ([], ['a1', 'a2'])
    """
    newest: dict[str, float] = {}
    for _, key, mtime in entries:
        newest[key] = max(mtime, newest.get(key, mtime))
    kept = set(sorted(newest, key=lambda k: newest[k], reverse=True)[:keep])
    return sorted(name for name, key, _ in entries if key not in kept)


def _prune(directory: Path, pattern: str, key: Callable[[str], str]) -> None:
    """Delete the files matching `pattern` in `directory` that `stale` names."""
    entries = []
    for path in directory.glob(pattern):
        with contextlib.suppress(OSError):  # gone meanwhile
            entries.append((path.name, key(path.name), path.stat().st_mtime))
    for name in stale(entries, KEEP_BUILDS):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def sample_image(version: str, *, bad: bool = False) -> Path:
    """A cached sample root-filesystem image of `version` (built on first use; building
    one drops the images of all but the KEEP_BUILDS newest code versions)."""
    suffix = "-bad" if bad else ""
    images = guest.cache_dir() / "images"
    path = images / f"sample-{version}{suffix}-{_code_key()}.img"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        guest.sample_image(path, version, bad=bad)
        _prune(images, "sample-*.img", lambda name: name.rsplit("-", 1)[-1])
    return path


def base_disk(image_path: Path) -> tuple[Path, str]:
    """The cached base disk with slot A = `image_path`; (path, image digest)."""
    from rollout.rootfs import load_rootfs_image

    image, _ = load_rootfs_image(image_path)
    cfg = hashlib.sha256(disk.GRUB_CFG.read_bytes()).hexdigest()[:8]
    path = guest.cache_dir() / "disks" / f"base-{image.digest[7:19]}-{cfg}.raw"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        disk.build_base(image_path, path)
        _prune(path.parent, "base-*.raw", lambda name: name)  # each disk its own build
    return path, image.digest


def agent_config(node_id: str, commit_deadline: float, keys: int = 0) -> dict[str, Any]:
    trusted = [f"{guest.DATA_MOUNT}/trusted/key-{i}.pub" for i in range(keys)]
    return {
        **({"trusted_keys": trusted} if trusted else {}),
        "listen": f"0.0.0.0:{guest.AGENT_PORT}",
        "node_id": node_id,
        "token_file": f"{guest.DATA_MOUNT}/{DATA_TOKEN}",
        "state_dir": f"{guest.DATA_MOUNT}/{AGENT_STATE}",
        "compatible": guest.COMPATIBLE,
        "slots": {"A": f"PARTUUID={guest.PARTUUID['A']}", "B": f"PARTUUID={guest.PARTUUID['B']}"},
        "grubenv": f"{guest.BOOT_MOUNT}/grubenv",
        "commit_deadline": commit_deadline,
        "workload_port": guest.WORKLOAD_PORT,
    }


def _addresses(base: str, count: int) -> list[str]:
    from rollout.fleet import _addresses as loopback

    return loopback(base, count)


def up(workdir: str | os.PathLike[str], image_path: str | None, opts: VMFleetOptions) -> Path:
    """Start the VM fleet; return the inventory path."""
    from rollout.agent.disk import provision
    from rollout.rootfs import read_image_manifest

    if opts.nodes < 1:
        raise InputError(f"--nodes: expected at least 1, got {opts.nodes}")
    guest.need("qemu-system-x86_64", package="qemu-system-x86")
    wd = Path(workdir).resolve()
    if (wd / FLEET_FILE).exists() and any(qemu.alive(v["pid"]) for v in _vms(wd).values()):
        raise InputError(
            f"{wd}: a fleet is running here; stop it: rollout fleet down --workdir {wd}"
        )
    hosts = _addresses(opts.base_address, opts.nodes)
    image = Path(image_path) if image_path else sample_image("1.0.0")
    manifest = read_image_manifest(image)
    if manifest.compatible != guest.COMPATIBLE:
        raise InputError(
            f"{image}: the image is for {manifest.compatible!r}; the VM nodes are "
            f"{guest.COMPATIBLE!r}"
        )
    base, digest = base_disk(image)
    accel = qemu.probe_accel(guest.base_tree() / "vmlinuz")
    wd.mkdir(parents=True, exist_ok=True)
    token_path = wd / TOKEN
    token = secrets.token_urlsafe(32)
    token_path.write_text(token + "\n")
    token_path.chmod(0o600)
    vms: dict[str, dict[str, Any]] = {}
    nodes: list[Node] = []
    width = max(2, len(str(opts.nodes)))
    for i, host in enumerate(hosts):
        node_id = f"vm-{i + 1:0{width}d}"
        nd = wd / "nodes" / node_id
        nd.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes | str] = {
            "agent.yaml": yaml.safe_dump(
                agent_config(node_id, opts.commit_deadline, len(opts.trusted_keys))
            ),
            DATA_TOKEN: token + "\n",
        }
        for k, key in enumerate(opts.trusted_keys):
            files[f"trusted/key-{k}.pub"] = Path(key).read_bytes()
        for rel, content in provision(digest, manifest).items():
            files[f"{AGENT_STATE}/{rel}"] = content
        data = disk.data_partition(nd / "data.ext4", files)
        vm_disk = disk.overlay(base, nd / "disk.qcow2", data)
        data.unlink()
        vms[node_id] = {
            "host": host,
            "disk": str(vm_disk),
            "console": str(nd / "console.log"),
            "journal": str(nd / "journal.log"),
            "memory": opts.memory,
            "accel": accel,
            "pid": 0,
        }
        rack = {"rack": f"rack-{i % opts.racks + 1}"}
        address = f"{host}:{guest.AGENT_PORT}"
        nodes.append(Node(node_id, address, rack, str(token_path), None))
    _write(wd, vms)
    try:
        for node_id in vms:
            power_on(wd, node_id)
        dump_inventory(nodes, TOKEN, wd / INVENTORY)
        wait_ready(wd, opts.ready_timeout)
    except BaseException:
        down(wd)
        raise
    return wd / INVENTORY


def _vms(wd: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((wd / FLEET_FILE).read_text())
    except (OSError, ValueError):
        return {}
    vms = data.get("vms", {}) if isinstance(data, dict) else {}
    return {str(k): dict(v) for k, v in vms.items()}


def is_vm_fleet(wd: Path) -> bool:
    try:
        return bool(json.loads((wd / FLEET_FILE).read_text()).get("kind") == "vm")
    except (OSError, ValueError, AttributeError):
        return False


def _write(wd: Path, vms: dict[str, dict[str, Any]]) -> None:
    tmp = wd / (FLEET_FILE + ".tmp")
    tmp.write_text(json.dumps({"kind": "vm", "vms": vms}, indent=2) + "\n")
    tmp.replace(wd / FLEET_FILE)


def _spec(node_id: str, vm: dict[str, Any]) -> qemu.VMSpec:
    return qemu.VMSpec(
        name=node_id, disk=Path(vm["disk"]), host=vm["host"], memory=int(vm["memory"]),
        accel=str(vm["accel"]), console=Path(vm["console"]),
        journal=Path(vm["journal"]) if vm.get("journal") else None,
    )  # fmt: skip


def power_on(wd: Path, node_id: str) -> int:
    """Start (or start again) `node_id`'s VM on its disk; return QEMU's pid."""
    vms = _vms(wd)
    vm = vms[node_id]
    if vm.get("pid") and qemu.alive(vm["pid"]) and qemu.is_qemu(vm["pid"], Path(vm["disk"])):
        raise InputError(f"{node_id}: its VM is already running (pid {vm['pid']})")
    pid = qemu.start(_spec(node_id, vm), Path(vm["disk"]).with_name("qemu.log"))
    vm["pid"] = pid
    vms[node_id] = vm
    _write(wd, vms)
    return pid


def power_cut(wd: Path, node_id: str) -> bool:
    """Pull the plug: SIGKILL the node's QEMU process. True when it was running."""
    vm = _vms(wd)[node_id]
    return qemu.kill(int(vm.get("pid") or 0), Path(vm["disk"]))


def wait_ready(wd: Path, timeout: float) -> None:
    """Wait until every VM's agent answers /healthz (polling with a deadline)."""
    from rollout.fleet import wait_healthz

    vms = _vms(wd)

    def alive(node_id: str) -> str | None:
        vm = vms[node_id]
        if qemu.alive(int(vm["pid"])):
            return None
        return f"QEMU exited; see {Path(vm['disk']).with_name('qemu.log')}"

    targets: dict[str, tuple[str, ssl.SSLContext | None]] = {
        n: (f"http://{v['host']}:{guest.AGENT_PORT}/healthz", None) for n, v in vms.items()
    }
    hint = "see nodes/<id>/console.log and journal.log in the workdir"
    wait_healthz(targets, timeout, "VMs", hint, interval=0.5, alive=alive)


def down(workdir: str | os.PathLike[str]) -> int:
    """Stop every VM of the fleet in `workdir`; return how many were running."""
    wd = Path(workdir).resolve()
    if not (wd / FLEET_FILE).exists():
        raise InputError(f"{wd}: no {FLEET_FILE} here; is this a fleet's --workdir?")
    stopped = 0
    for vm in _vms(wd).values():
        if qemu.kill(int(vm.get("pid") or 0), Path(vm["disk"])):
            stopped += 1
    (wd / FLEET_FILE).unlink(missing_ok=True)
    return stopped


def describe(opts: VMFleetOptions) -> dict[str, Any]:
    return asdict(opts)
