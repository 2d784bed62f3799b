"""QEMU processes for VM nodes: accelerator probing, start, power cut, stop.

Accelerator: KVM when it really runs a Debian kernel here, TCG otherwise. A nested
/dev/kvm may exist and still fail (the kernel's decompressor hits an emulation failure),
so the probe boots the guest's own kernel under KVM with no disk and waits for it to
reach its root-mount panic; the verdict is cached per QEMU version and kernel. TCG runs
with `tb-size=256` (keeps a VM near 580 MB RSS).

Networking is QEMU's user mode: the guest is always 10.0.2.15; each VM forwards its agent
and workload ports from its own loopback address (127.0.0.0/8) on the host.

A VM is one QEMU process started in its own session; `kill` is a power cut (SIGKILL,
nothing flushed beyond what the guest wrote: disks use cache=unsafe for speed, which
keeps written data in the host page cache, so it survives QEMU's death but not the
host's). A guest reboot or kexec stays inside the same QEMU process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rollout.errors import InputError
from rollout.fleet import pid_alive
from rollout.vm import guest

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 384
_PROBE_TIMEOUT = 40.0


def qemu_binary() -> str:
    found = shutil.which(QEMU)
    if found is None:
        raise InputError(f"{QEMU} not found; install it (Debian: apt-get install qemu-system-x86)")
    return found


def _version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def probe_accel(kernel: Path) -> str:
    """'kvm' when KVM boots `kernel` to its root-mount panic, else 'tcg' (cached)."""
    forced = os.environ.get("ROLLOUT_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    binary = qemu_binary()
    key = hashlib.sha256(f"{_version(binary)}|{kernel.stat().st_size}".encode()).hexdigest()[:12]
    cache = guest.cache_dir() / f"accel-{key}.json"
    try:
        return str(json.loads(cache.read_text())["accel"])
    except (OSError, ValueError, KeyError):
        pass
    accel = "tcg"
    with tempfile.TemporaryDirectory(prefix="rollout-probe-") as tmp:
        console = Path(tmp) / "console.log"
        proc = subprocess.Popen(
            [binary, "-accel", "kvm", "-cpu", "host", "-m", "256", "-display", "none",
             "-no-reboot", "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
             "-serial", f"file:{console}", "-monitor", "none"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + _PROBE_TIMEOUT
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                text = console.read_text(errors="replace") if console.exists() else ""
                if "Kernel panic" in text or "VFS:" in text:
                    accel = "kvm"
                    break
                time.sleep(0.2)  # polling the probe's console, with a deadline
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"accel": accel}) + "\n")
    return accel


@dataclass(frozen=True)
class VMSpec:
    name: str
    disk: Path
    host: str  # loopback address the ports are forwarded from
    ports: tuple[int, ...] = (guest.AGENT_PORT, guest.WORKLOAD_PORT)
    memory: int = MEMORY_MIB
    accel: str = "tcg"
    console: Path = field(default=Path("console.log"))
    journal: Path | None = None  # ttyS1, appended to: the guest's journal tap


def command(spec: VMSpec) -> list[str]:
    fwd = ",".join(f"hostfwd=tcp:{spec.host}:{p}-{guest.GUEST_IP}:{p}" for p in spec.ports)
    accel = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else [
        "-accel", "tcg,tb-size=256"]  # fmt: skip
    return [
        qemu_binary(), "-name", spec.name, *accel, "-m", str(spec.memory), "-smp", "1",
        "-display", "none", "-monitor", "none", "-serial", f"file:{spec.console}",
        "-drive", f"file={spec.disk},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-netdev", f"user,id=net0,{fwd}", "-device", "virtio-net-pci,netdev=net0",
        "-device", "virtio-rng-pci",
        *([] if spec.journal is None else [
            "-chardev", f"file,id=journal,path={spec.journal},append=on",
            "-device", "isa-serial,chardev=journal,index=1"]),
    ]  # fmt: skip


def start(spec: VMSpec, log: Path) -> int:
    """Start the VM in the background; return QEMU's pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command(spec), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return proc.pid


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone); 0 is never alive."""
    return pid > 0 and pid_alive(pid)


def is_qemu(pid: int, disk: Path) -> bool:
    """True when `pid` is a QEMU of ours running `disk` (never signal a stranger)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    return bool(argv) and Path(argv[0]).name == QEMU and any(str(disk) in a for a in argv)


def kill(pid: int, disk: Path, timeout: float = 10.0) -> bool:
    """Power cut: SIGKILL the QEMU process (if it is ours); True when it was running."""
    if not alive(pid) or not is_qemu(pid, disk):
        return False
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)  # polling for the exit, with a deadline
    return True
