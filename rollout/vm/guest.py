"""The sample guest OS: a small Debian 13 tree with the rollout agent, and its images.

`base_tree()` runs `debootstrap --variant=minbase` of trixie (systemd 257 for
soft-reboot, kernel 6.12, Python 3.13 with python3-aiohttp) once and caches the cleaned
tree under the cache dir; later calls reuse it. The tree is made bootable from a slot:

- the kernel and a small initrd (MODULES=list: virtio_blk, ext4) stay in the tree
  (/vmlinuz, /initrd.img), so GRUB loads them from the slot and kexec from a mount of it;
- fstab mounts the boot partition at /boot/grub (GRUB's environment block lives there)
  and the data partition at /var/lib/rollout (the agent's state, shared by both slots);
  the root device is not in fstab (it differs per slot) and comes from `root=`;
- systemd-networkd gives the virtio NIC QEMU's user-network address, and
  `rollout-agent.service` runs `python3 -m rollout agent --config
  /var/lib/rollout/agent.yaml` (node-specific settings live on the node's data partition,
  so one image fits every node);
- kernel modules are cut down to what a virtio machine needs, docs and caches removed.

`sample_tree()` copies the base, adds the rollout package and the sample web service
(the same stdlib HTTP server as the emulated sample, run by systemd on port 8080; the bad
build exits at start, so its unit fails), and `sample_image()` packs it as a root-filesystem image.

Everything here runs on the host as root (debootstrap, chroot, mkfs.ext4 -d) and blocks.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import rollout
from rollout.errors import InputError
from rollout.model import Image
from rollout.sample import WORKLOAD_PY

SUITE = "trixie"
COMPATIBLE = "rollout-vm-x86_64"
SERVICE = "sample-web.service"
AGENT_UNIT = "rollout-agent.service"
DATA_MOUNT = "/var/lib/rollout"
BOOT_MOUNT = "/boot/grub"
DISK_ID = "524f4c4c"  # MBR disk identifier: PARTUUIDs are DISK_ID-01 .. -04
PARTUUID = {
    "boot": f"{DISK_ID}-01",
    "A": f"{DISK_ID}-02",
    "B": f"{DISK_ID}-03",
    "data": f"{DISK_ID}-04",
}
GUEST_IP = "10.0.2.15"  # QEMU user networking: guest address, gateway .2
AGENT_PORT = 7000
WORKLOAD_PORT = 8080

PACKAGES = [
    "systemd", "systemd-sysv", "udev", "linux-image-amd64", "initramfs-tools",
    "kexec-tools", "e2fsprogs", "util-linux", "iproute2", "python3", "python3-aiohttp",
    "python3-tenacity", "python3-prometheus-client", "python3-structlog", "python3-pydantic",
    "python3-yaml", "python3-click", "python3-rich", "python3-cryptography",
    "python3-cffi-backend",  # debootstrap does not resolve the virtual package cryptography needs
]  # fmt: skip
# Kernel modules kept (with their dependencies): a virtio machine on ext4.
MODULES = [
    "virtio_blk", "virtio_net", "ext4", "virtio_rng", "virtio_console", "crc32c_generic",
    "crc32c_intel",
]  # fmt: skip
INITRD_MODULES = ["virtio_blk", "crc32c_generic", "crc32c_intel", "ext4"]
BASE_FORMAT = 3  # bump when the base tree's recipe changes: invalidates the cache

FSTAB = f"""\
# Written by rollout: the root device comes from root= (it differs per slot).
PARTUUID={PARTUUID["boot"]} {BOOT_MOUNT} ext4 defaults,noatime 0 2
PARTUUID={PARTUUID["data"]} {DATA_MOUNT} ext4 defaults,noatime 0 2
"""

NETWORK = f"""\
[Match]
Type=ether

[Network]
Address={GUEST_IP}/24
Gateway=10.0.2.2
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

AGENT_SERVICE = f"""\
[Unit]
Description=rollout node agent
After=local-fs.target network.target
RequiresMountsFor={DATA_MOUNT} {BOOT_MOUNT}
ConditionPathExists={DATA_MOUNT}/agent.yaml

[Service]
ExecStart=/usr/bin/python3 -m rollout agent --config {DATA_MOUNT}/agent.yaml
Restart=always
RestartSec=1
KillMode=mixed
TimeoutStopSec=10

[Install]
WantedBy=multi-user.target
"""

# The guest's journal for the agent and the workload, copied as it is written to the
# second serial port (ttyS1): the host keeps it in nodes/<id>/journal.log, across reboots
# and power cuts, so a failed run can be read without logging in to the guest.
JOURNAL_UNIT = "rollout-journal-tap.service"
JOURNAL_SERVICE = f"""\
[Unit]
Description=copy the rollout agent's journal to ttyS1 (the host's journal.log)
After=systemd-journald.service

[Service]
ExecStart=/bin/sh -c 'echo "-- boot $$(cat /proc/sys/kernel/random/boot_id) --" >/dev/ttyS1; \\
  exec journalctl --follow --boot --output=short-monotonic \\
  --cursor-file=/run/rollout-journal-tap.cursor \\
  --unit={AGENT_UNIT} --unit={SERVICE} >/dev/ttyS1'
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

WEB_SERVICE = """\
[Unit]
Description=rollout sample web service
After=network.target

[Service]
ExecStart=/usr/bin/python3 /opt/sample-web/server.py
Environment=SAMPLE_MODE={mode} ROLLOUT_IMAGE_VERSION={version}
Environment=ROLLOUT_WORKLOAD_HOST=0.0.0.0 ROLLOUT_WORKLOAD_PORT={port}
Restart=no

[Install]
WantedBy=multi-user.target
"""

_DROP = [
    "var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
    "usr/share/info", "usr/share/locale", "usr/share/lintian", "usr/share/zoneinfo/right",
    "var/log/journal", "usr/lib/firmware",
]  # fmt: skip


def cache_dir() -> Path:
    """Where built trees, images and base disks are kept ($ROLLOUT_CACHE or ~/.cache)."""
    env = os.environ.get("ROLLOUT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rollout" / "vm"


def _run(args: list[str], what: str, **kw: object) -> str:
    done = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        **kw,  # type: ignore[call-overload]
    )
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise InputError(f"{what}: `{' '.join(args[:4])} ...` failed ({done.returncode}):\n{tail}")
    return str(done.stdout)


def need(*commands: str, package: str) -> None:
    """Refuse early, naming the Debian package, when a host command is missing."""
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        raise InputError(
            f"the VM fleet needs {', '.join(missing)} on this host; install it "
            f"(Debian: apt-get install {package})"
        )


def debian_mirror() -> str:
    """The Debian archive this host's apt uses ($ROLLOUT_DEBIAN_MIRROR overrides it)."""
    env = os.environ.get("ROLLOUT_DEBIAN_MIRROR")
    if env:
        return env
    candidates: list[str] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        candidates += re.findall(r"^URIs:\s*(\S+)", text, re.M)
        candidates += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    raise InputError(
        "no Debian archive found in /etc/apt/sources.list*; set ROLLOUT_DEBIAN_MIRROR to "
        "the URL of a Debian mirror (the one apt uses)"
    )


def _base_key() -> str:
    recipe = repr((BASE_FORMAT, SUITE, PACKAGES, MODULES, INITRD_MODULES, FSTAB, NETWORK))
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def base_tree(log: object = None) -> Path:
    """The cleaned, bootable Debian tree (built once; cached by its recipe)."""
    root = cache_dir() / f"base-{_base_key()}"
    if (root / ".complete").exists():
        return root / "tree"
    need("debootstrap", package="debootstrap")
    need("chroot", package="coreutils")
    if os.geteuid() != 0:
        raise InputError("building the VM guest needs root (debootstrap, chroot)")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    tree = root / "tree"
    _run(
        [
            "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
            SUITE, str(tree), debian_mirror(),
        ],
        "debootstrap of the guest",
    )  # fmt: skip
    _configure(tree)
    (root / ".complete").write_text("ok\n")
    return tree


def _configure(tree: Path) -> None:
    (tree / "etc/hostname").write_text("rollout-node\n")
    (tree / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 rollout-node\n")
    (tree / "etc/fstab").write_text(FSTAB)
    (tree / "etc/machine-id").write_text(hashlib.md5(b"rollout-node").hexdigest() + "\n")
    for mount in (BOOT_MOUNT, DATA_MOUNT):
        (tree / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
    net = tree / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "10-virtio.network").write_text(NETWORK)
    units = tree / "etc/systemd/system"
    (units / AGENT_UNIT).write_text(AGENT_SERVICE)
    # No waiting for a network that is configured statically.
    (units / "systemd-networkd-wait-online.service").unlink(missing_ok=True)
    os.symlink("/dev/null", units / "systemd-networkd-wait-online.service")
    _run(
        ["chroot", str(tree), "systemctl", "enable", "systemd-networkd", AGENT_UNIT],
        "enabling guest units",
    )
    (tree / "etc/initramfs-tools/modules").write_text("\n".join(INITRD_MODULES) + "\n")
    conf = tree / "etc/initramfs-tools/initramfs.conf"
    conf.write_text(re.sub(r"^MODULES=.*$", "MODULES=list", conf.read_text(), flags=re.M))
    _prune_modules(tree)
    _run(["chroot", str(tree), "update-initramfs", "-u", "-k", "all"], "making the initrd")
    for rel in _DROP:
        shutil.rmtree(tree / rel, ignore_errors=True)
    (tree / "var/cache/apt").mkdir(parents=True, exist_ok=True)
    (tree / "var/lib/apt/lists").mkdir(parents=True, exist_ok=True)


def _prune_modules(tree: Path) -> None:
    """Keep MODULES and their dependencies (from modules.dep); drop the rest; depmod."""
    for kdir in (tree / "usr/lib/modules").iterdir():
        deps: dict[str, list[str]] = {}
        for line in (kdir / "modules.dep").read_text().splitlines():
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
        by_name = {Path(p).name.split(".")[0].replace("-", "_"): p for p in deps}
        keep: set[str] = set()
        todo = [by_name[m] for m in MODULES if m in by_name]
        while todo:
            path = todo.pop()
            if path not in keep:
                keep.add(path)
                todo.extend(deps.get(path, []))
        for path in deps:
            if path not in keep:
                (kdir / path).unlink(missing_ok=True)
        _run(["chroot", str(tree), "depmod", kdir.name], "depmod")


def sample_tree(dest: Path, version: str, *, bad: bool = False) -> Path:
    """A copy of the base tree with the rollout package and the sample web service."""
    base = base_tree()
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run(["cp", "-a", "--reflink=auto", str(base), str(dest)], "copying the base tree")
    site = dest / "usr/lib/python3/dist-packages/rollout"
    package = Path(rollout.__file__).parent
    shutil.copytree(package, site, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(
        ["chroot", str(dest), "python3", "-m", "compileall", "-q",
         "/usr/lib/python3/dist-packages/rollout"],
        "compiling the agent",
    )  # fmt: skip
    app = dest / "opt/sample-web"
    app.mkdir(parents=True, exist_ok=True)
    (app / "server.py").write_text(WORKLOAD_PY)
    units = dest / "etc/systemd/system"
    (units / SERVICE).write_text(
        WEB_SERVICE.format(mode="crash" if bad else "good", version=version, port=WORKLOAD_PORT)
    )
    (units / JOURNAL_UNIT).write_text(JOURNAL_SERVICE)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    for unit in (SERVICE, JOURNAL_UNIT):
        link = wants / unit
        link.unlink(missing_ok=True)
        os.symlink(f"/etc/systemd/system/{unit}", link)
    (dest / "etc/rollout-release").write_text(f"sample-os {version}\n")
    return dest


def sample_image(output: Path, version: str, *, bad: bool = False) -> Image:
    """Build (or reuse, when the same recipe made it) a sample root-filesystem image."""
    from rollout.rootfs import build_rootfs_image

    work = cache_dir() / "work" / f"tree-{version}"
    try:
        sample_tree(work, version, bad=bad)
        return build_rootfs_image(
            work, output, version=version, name="sample-os", compatible=COMPATIBLE,
            units=[SERVICE],
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
