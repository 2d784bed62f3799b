"""Real Linux nodes: rollouts to QEMU VMs with A/B partitions, GRUB, reboot, kexec and
soft-reboot (the `vm` marker; `make test-vm`, its own stage in .ci/run).

One fleet of two VMs serves the whole module and the tests run in file order, each
starting from where the previous one left the nodes (that is what a real fleet does, and
it keeps CI within its budget: a VM boot under TCG takes 30-85 s). Every assertion reads
the agent's real status: the digest booted, the root device the kernel mounted, the
kernel's boot id, GRUB's environment block, the boot count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rollout.image import sha256_file
from rollout.vm import fleet as vm_fleet
from rollout.vm import guest
from tests.helpers import wait_for

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
SLOT_DEVICE = {"A": "/dev/vda2", "B": "/dev/vda3"}
BOOT_WAIT = 420.0  # a reboot under TCG with two VMs on two cores, with slack


@dataclass
class VMFleet:
    workdir: Path
    inventory: Path
    token: str
    hosts: dict[str, str]
    images: dict[str, Path]

    def url(self, node: str, path: str) -> str:
        return f"http://{self.hosts[node]}:{guest.AGENT_PORT}{path}"

    def call(
        self, node: str, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, timeout: float = 30,
    ) -> tuple[int, dict[str, Any]]:  # fmt: skip
        req = urllib.request.Request(self.url(node, path), data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def status(self, node: str) -> dict[str, Any]:
        code, body = self.call(node, "GET", "/v1/status", timeout=5)
        assert code == 200, body
        return body

    def wait(self, node: str, cond: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = BOOT_WAIT) -> dict[str, Any]:  # fmt: skip
        """Poll the agent's status until `cond` holds (a deadline, not a sleep)."""
        try:
            return wait_for(
                lambda: self.status(node), timeout, 1, what=f"{node} {what}", done=cond,
                ignore=(OSError, AssertionError, ValueError),
            )  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs(node)}") from None

    def logs(self, node: str) -> str:
        """The tails of the node's serial console and of its agent's journal."""
        tails = []
        for name, size in (("console.log", 1500), ("journal.log", 4000)):
            path = self.workdir / "nodes" / node / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            tails.append(f"--- {name} ---\n{text[-size:]}")
        return "\n".join(tails)

    def stage(self, node: str, image: Path) -> tuple[int, dict[str, Any]]:
        digest = sha256_file(image)
        return self.call(node, "PUT", "/v1/image", image.read_bytes(),
                         {"X-Image-Digest": digest}, timeout=600)  # fmt: skip


def run(
    vms: VMFleet, image: Path, mode: str, tmp: Path, **policy: Any
) -> subprocess.CompletedProcess[str]:
    body: dict[str, Any] = {
        "activation": mode,
        "batches": {"canary": 0, "size": "100%", "max_unavailable": "100%"},
        "health": {
            "checks": [
                {"type": "http", "port": guest.WORKLOAD_PORT, "path": "/"},
                {"type": "agent"},
            ],
            "interval": "1s", "min_healthy_time": "3s", "deadline": "3m",
            "boot_timeout": "7m", "failure_threshold": 0,
        },
        "failure": {"max_failed": 0, "action": "rollback"},
    }  # fmt: skip
    body.update(policy)
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(body))
    return subprocess.run(
        [sys.executable, "-m", "rollout", "run", "--inventory", str(vms.inventory),
         "--policy", str(path), "--image", str(image), "--state", str(tmp / "state.db"),
         "--output", "json", "--log-format", "json"],
        capture_output=True, text=True, timeout=1500, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def vms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VMFleet]:
    if os.geteuid() != 0:
        pytest.skip("VM tests build guest disks with debootstrap and chroot: run as root")
    images = {
        "v1": vm_fleet.sample_image("1.0.0"),
        "v2": vm_fleet.sample_image("2.0.0"),
        "v3": vm_fleet.sample_image("3.0.0"),
        "bad": vm_fleet.sample_image("4.0.0", bad=True),
    }
    wd = tmp_path_factory.mktemp("vmfleet")
    inventory = vm_fleet.up(
        wd, str(images["v1"]), vm_fleet.VMFleetOptions(nodes=2, base_address="127.0.0.40")
    )
    token = (wd / "token").read_text().strip()
    hosts = {
        n["id"]: n["address"].split(":")[0] for n in yaml.safe_load(inventory.read_text())["nodes"]
    }
    try:
        yield VMFleet(wd, inventory, token, hosts, images)
    finally:
        vm_fleet.down(wd)


def digest(image: Path) -> str:
    return sha256_file(image)


def test_reboot_rollout_moves_both_vms_to_v2_with_one_boot_each(
    vms: VMFleet, tmp_path: Path
) -> None:
    before = {n: vms.status(n) for n in vms.hosts}
    for st in before.values():
        assert st["backend"]["kind"] == "disk"
        assert st["backend"]["root_device"] == SLOT_DEVICE["A"]
        assert st["booted"]["digest"] == digest(vms.images["v1"]) and st["committed"]
    proc = run(vms, vms.images["v2"], "reboot", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for node, old in before.items():
        st = vms.status(node)
        assert st["booted"]["digest"] == digest(vms.images["v2"])
        assert st["committed"] and st["boot_count"] == old["boot_count"] + 1
        assert st["backend"]["root_device"] == SLOT_DEVICE["B"]
        assert st["backend"]["kernel_boot_id"] != old["backend"]["kernel_boot_id"]
        # Committed in GRUB's environment: B first, confirmed (TRY=0); A still good.
        assert st["backend"]["grubenv"] == {
            "ORDER": "B A", "B_OK": "1", "B_TRY": "0", "A_OK": "1", "A_TRY": "0"}  # fmt: skip
        assert st["workload"]["units"] == {guest.SERVICE: "active"}
    # What an operator sees: `rollout status` shows each node's real root device.
    proc = subprocess.run(
        [sys.executable, "-m", "rollout", "status", "--inventory", str(vms.inventory),
         "--output", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {r["node"]: r for r in json.loads(proc.stdout)["nodes"]}
    assert {r["root"] for r in rows.values()} == {SLOT_DEVICE["B"]}
    assert all(r["healthy"] and r["version"] == "2.0.0" for r in rows.values())


def test_kexec_rollout_boots_the_new_slot_without_grub(vms: VMFleet, tmp_path: Path) -> None:
    before = {n: vms.status(n) for n in vms.hosts}
    proc = run(vms, vms.images["v3"], "kexec", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for node, old in before.items():
        st = vms.status(node)
        assert st["booted"]["digest"] == digest(vms.images["v3"]) and st["committed"]
        assert st["boot_count"] == old["boot_count"] + 1
        assert st["backend"]["root_device"] == SLOT_DEVICE["A"]
        assert st["backend"]["kernel_boot_id"] != old["backend"]["kernel_boot_id"]  # new kernel
        assert st["backend"]["grubenv"]["ORDER"] == "A B"  # written by the commit only


def test_soft_reboot_rollout_changes_root_but_not_the_kernel(vms: VMFleet, tmp_path: Path) -> None:
    before = {n: vms.status(n) for n in vms.hosts}
    proc = run(vms, vms.images["v2"], "soft-reboot", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for node, old in before.items():
        st = vms.status(node)
        assert st["booted"]["digest"] == digest(vms.images["v2"]) and st["committed"]
        assert st["boot_count"] == old["boot_count"] + 1
        assert st["backend"]["root_device"] == SLOT_DEVICE["B"]  # the new userspace's root
        assert st["backend"]["kernel_boot_id"] == old["backend"]["kernel_boot_id"]  # same kernel


def status_with_tag(vms: VMFleet, node: str, tag: str | None = None,
                    wait: float | None = None) -> tuple[int, str, dict[str, Any]]:  # fmt: skip
    """GET /v1/status (a long poll when `tag` and `wait` are given): code, ETag, body."""
    req = urllib.request.Request(
        vms.url(node, "/v1/status" + (f"?wait={wait}" if wait is not None else ""))
    )
    req.add_header("Authorization", f"Bearer {vms.token}")
    if tag is not None:
        req.add_header("If-None-Match", tag)
    try:
        with urllib.request.urlopen(req, timeout=(wait or 0) + 30) as r:
            return r.status, r.headers["ETag"], json.loads(r.read())
    except urllib.error.HTTPError as exc:  # 304 has no body
        return exc.code, exc.headers["ETag"], {}


def test_status_long_poll_on_a_real_node(vms: VMFleet) -> None:
    """The disk agent (a systemd service on a real kernel) holds a status long poll until
    its status changes, or answers 304 with the same tag when nothing did."""
    node = "vm-01"
    # Settled: the workload runs and systemd has finished booting (`system` moves from
    # "starting" or "unknown" to "running" a while after the agent answers).
    vms.wait(
        node,
        lambda s: (
            s["workload"]["state"] == "running"
            and s["workload"]["system"] in ("running", "degraded")
        ),
        "settled",
    )
    code, tag, first = status_with_tag(vms, node)
    assert code == 200 and tag
    code, again, body = status_with_tag(vms, node, tag, wait=1.5)
    changed = {k: (first.get(k), body[k]) for k in body if body[k] != first.get(k)}
    assert (code, again) == (304, tag), f"changed while settled: {changed}"
    answers: list[tuple[int, str, dict[str, Any]]] = []
    poll = threading.Thread(target=lambda: answers.append(status_with_tag(vms, node, tag, 60)))
    poll.start()
    try:
        lease = json.dumps({"holder": "vm-long-poll", "ttl": 120}).encode()
        code, body = vms.call(node, "PUT", "/v1/lease", lease)
        assert code == 200 and body["acquired"], body
        poll.join(timeout=45)  # answered by the change, well before the poll's 60 s
        assert not poll.is_alive(), "the long poll did not answer the lease"
        code, new_tag, st = answers[0]
        assert code == 200 and new_tag != tag and st["lease"]["holder"] == "vm-long-poll"
    finally:
        release = json.dumps({"holder": "vm-long-poll"}).encode()
        code, body = vms.call(node, "DELETE", "/v1/lease", release)
        assert code == 200 and body["released"], body
        poll.join(timeout=70)


def test_incompatible_image_is_refused_before_a_byte_is_written(
    vms: VMFleet, tmp_path: Path
) -> None:
    from rollout.rootfs import build_rootfs_image

    tree = tmp_path / "tree"
    guest.sample_tree(tree, "9.9.9")
    other = tmp_path / "other.img"
    build_rootfs_image(tree, other, version="9.9.9", name="sample-os",
                       compatible="some-other-board", units=[guest.SERVICE])  # fmt: skip
    node = "vm-01"
    before = vms.status(node)
    code, body = vms.stage(node, other)
    assert code == 422 and body["error"] == "incompatible" and body["written"] is False, body
    after = vms.status(node)
    assert after["staged"] is None and after["backend"]["grubenv"] == before["backend"]["grubenv"]
    # Slot A still holds v3, untouched: rolling back onto it boots v3.
    code, body = vms.call(
        node, "POST", "/v1/rollback", json.dumps({"mode": "soft-reboot"}).encode()
    )
    assert code == 202, body
    st = vms.wait(
        node,
        lambda s: (
            s["boot_count"] == before["boot_count"] + 1 and s["workload"]["state"] == "running"
        ),
        "back on slot A",
    )
    assert st["booted"]["digest"] == digest(vms.images["v3"]) and st["committed"]
    assert st["backend"]["root_device"] == SLOT_DEVICE["A"]


def test_bad_image_is_rolled_back_by_the_controller(vms: VMFleet, tmp_path: Path) -> None:
    before = {n: vms.status(n) for n in vms.hosts}
    proc = run(vms, vms.images["bad"], "reboot", tmp_path,
               batches={"canary": 1, "size": "100%", "max_unavailable": "100%"})  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    canary, other = "vm-01", "vm-02"
    st = vms.status(canary)
    assert st["booted"]["digest"] == before[canary]["booted"]["digest"] and st["committed"]
    assert st["backend"]["root_device"] == before[canary]["backend"]["root_device"]
    assert st["boot_count"] >= before[canary]["boot_count"] + 2  # into bad, and back
    # The bad slot may never boot again.
    bad_slot = "B" if st["booted"]["slot"] == "A" else "A"
    assert st["backend"]["grubenv"][f"{bad_slot}_OK"] == "0"
    assert vms.status(other)["boot_count"] == before[other]["boot_count"]  # never touched


def test_agent_falls_back_by_itself_without_a_controller(vms: VMFleet) -> None:
    node = "vm-02"
    start = vms.status(node)
    good = start["booted"]
    # A service that fails, activated with nobody watching: the agent reboots to the good slot.
    code, body = vms.stage(node, vms.images["bad"])
    assert code == 200, body
    code, body = vms.call(node, "POST", "/v1/activate", json.dumps({"mode": "reboot"}).encode())
    assert code == 202, body
    st = vms.wait(
        node,
        lambda s: s["fell_back"] is not None and s["workload"]["state"] == "running",
        "fallen back",
    )
    assert st["fell_back"]["reason"] == "workload_failed"
    assert st["booted"] == good and st["committed"]
    assert st["boot_count"] == start["boot_count"] + 2
    # GRUB's boot counting: a good image booted by reboot and never committed; the power
    # fails; the firmware (GRUB, TRY=1) skips the unconfirmed slot and boots the good one.
    code, body = vms.stage(
        node, vms.images["v3"] if good["digest"] != digest(vms.images["v3"]) else vms.images["v1"]
    )
    assert code == 200, body
    count = st["boot_count"]
    code, body = vms.call(node, "POST", "/v1/activate", json.dumps({"mode": "reboot"}).encode())
    assert code == 202, body
    st = vms.wait(
        node,
        lambda s: s["boot_count"] == count + 1 and not s["committed"],
        "on the new slot, uncommitted",
    )
    assert st["backend"]["grubenv"][f"{st['booted']['slot']}_TRY"] == "1"
    assert vm_fleet.power_cut(vms.workdir, node)
    vm_fleet.power_on(vms.workdir, node)
    st = vms.wait(
        node,
        lambda s: s["boot_count"] == count + 2 and s["workload"]["state"] == "running",
        "rebooted",
    )
    assert st["booted"] == good and st["committed"]
    assert st["fell_back"]["reason"] == "boot_tries_exhausted"


def test_power_cut_mid_stage_boots_the_good_slot_and_claims_nothing(vms: VMFleet) -> None:
    node = "vm-01"
    start = vms.status(node)
    image = (
        vms.images["v1"]
        if start["booted"]["digest"] != digest(vms.images["v1"])
        else vms.images["v2"]
    )
    result: dict[str, Any] = {}

    def upload() -> None:
        try:
            result["answer"] = vms.stage(node, image)
        except Exception as exc:  # OSError: the VM died under the upload; else, reported
            result["error"] = exc

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    # Staging, or the upload already ended (then it says why it never staged).
    try:
        st = vms.wait(
            node, lambda s: s["busy"] == "staging" or not thread.is_alive(), "staging", timeout=60
        )
    except AssertionError as exc:
        raise AssertionError(f"upload still running, not staging: {exc}") from None
    assert st["busy"] == "staging", f"upload ended: {result}\n{vms.logs(node)}"
    inactive = "B" if start["booted"]["slot"] == "A" else "A"
    # Wait until the slot is being written (GRUB already told not to boot it).
    vms.wait(
        node, lambda s: s["backend"]["grubenv"][f"{inactive}_OK"] == "0", "writing", timeout=120
    )
    assert vm_fleet.power_cut(vms.workdir, node)
    thread.join(60)
    vm_fleet.power_on(vms.workdir, node)
    st = vms.wait(node, lambda s: s["workload"]["state"] == "running", "booted again")
    assert st["booted"] == start["booted"] and st["committed"] and st["staged"] is None
    assert st["backend"]["grubenv"][f"{inactive}_OK"] == "0"
    assert st["boot_count"] == start["boot_count"] + 1
    # The host kept the guest's journal through the cut: the stage begun, then this boot.
    journal = vms.workdir / "nodes" / node / "journal.log"
    marker = f"-- boot {st['backend']['kernel_boot_id']} --"
    text = wait_for(journal.read_text, 60, 1, what="the new boot in journal.log",
                    done=lambda t: marker in t)  # fmt: skip
    assert "stage_begin" in text[: text.index(marker)]
    code, body = vms.stage(node, image)
    assert code == 200 and body["written"] is True and body["slot"] == inactive, body
    assert vms.status(node)["staged"]["digest"] == digest(image)


async def test_both_vms_pull_from_a_registry_one_through_a_cut_and_resume(
    vms: VMFleet, tmp_path: Path
) -> None:
    """Pull mode on real nodes: a docker-registry on the host (TLS, basic auth), reached by
    the guests at QEMU's host address 10.0.2.2 through the inventory's per-site mirrors;
    vm-01's path goes through a proxy that cuts the blob transfer once mid-way."""
    import asyncio

    from tests.registry import CuttingProxy, registries

    booted = {vms.status(n)["booted"]["digest"] for n in vms.hosts}
    image = next(vms.images[v] for v in ("v1", "v2", "v3") if digest(vms.images[v]) not in booted)
    want = digest(image)
    # A node may have that image staged from the tests before: drop it (DELETE /v1/image),
    # so both nodes really fetch.
    for node in vms.hosts:
        body = json.dumps({"digest": want}).encode()
        code, answer = vms.call(node, "DELETE", "/v1/image", body)
        assert code == 200, answer
        assert vms.status(node)["staged"] is None
    before = {n: vms.status(n) for n in vms.hosts}
    (tmp_path / "regs").mkdir()
    with registries(tmp_path / "regs") as factory:
        registry = factory.start(host="127.0.0.1", port=5443, extra_hosts=("10.0.2.2",))
        ref = f"oci://{registry.address}/fleet/sample-os:candidate"
        pushed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rollout", "image", "push", str(image), ref,
            "--authfile", str(registry.authfile), "--registry-ca", str(registry.ca_pem),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await pushed.communicate()
        assert pushed.returncode == 0, err.decode()
        size = image.stat().st_size
        async with CuttingProxy(registry.address, cut_after=size // 3, host="127.0.0.1") as proxy:
            proxy_port = proxy.address.rsplit(":", 1)[1]
            inv = yaml.safe_load(vms.inventory.read_text())
            for node in inv["nodes"]:
                node["labels"] = {"path": "cut" if node["id"] == "vm-01" else "direct"}
            inv["registry_mirrors"] = [
                {"match": {"path": "cut"}, "registry": f"10.0.2.2:{proxy_port}"},
                {"match": {"path": "direct"}, "registry": "10.0.2.2:5443"},
            ]
            inventory = vms.inventory.with_name("inventory-pull.yaml")
            inventory.write_text(yaml.safe_dump(inv))
            auths = json.loads(registry.authfile.read_text())["auths"]
            secret = auths[registry.address]
            authfile = tmp_path / "auth.json"
            authfile.write_text(json.dumps({"auths": auths | {
                "10.0.2.2:5443": secret, f"10.0.2.2:{proxy_port}": secret}}))  # fmt: skip
            policy = tmp_path / "policy.yaml"
            policy.write_text(yaml.safe_dump({
                "activation": "soft-reboot",
                "batches": {"canary": 1, "size": "100%", "max_unavailable": "100%"},
                "health": {"checks": [{"type": "http", "port": guest.WORKLOAD_PORT, "path": "/"},
                                      {"type": "agent"}],
                           "interval": "1s", "min_healthy_time": "3s", "deadline": "3m",
                           "boot_timeout": "7m"},
                "failure": {"max_failed": 0, "action": "rollback"},
                "prestage": "all",
            }))  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "rollout", "run", "--inventory", str(inventory),
                "--policy", str(policy), "--image", ref, "--state", str(tmp_path / "state.db"),
                "--authfile", str(authfile), "--registry-ca", str(registry.ca_pem),
                "--output", "json", "--log-format", "json",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 1500)
            assert proc.returncode == 0, out.decode()[-3000:] + err.decode()[-3000:]
            assert proxy.cuts == 1
        ranged = [line for line in registry.access_log() if '" 206 ' in line]
        assert ranged, registry.access_log()
        assert registry.password not in err.decode()
    for node, old in before.items():
        st = vms.status(node)
        assert st["booted"]["digest"] == want and st["committed"]
        assert st["boot_count"] == old["boot_count"] + 1
        assert st["fetch"]["state"] == "staged" and st["fetch"]["bytes"] == size
    assert vms.status("vm-01")["fetch"]["resumes"] >= 1
    assert vms.status("vm-01")["fetch"]["url"].startswith(f"https://10.0.2.2:{proxy_port}/")
