"""What several test modules share: the one polling helper, the CLI and service runners,
sample policies, journal entries and image trees. Tests import from here (or from
tests/conftest.py for fixtures), never from each other."""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import aiohttp
import yaml

from rollout.entries import CreatedEntry, ImageData, InventoryNode, PlannedBatch
from rollout.journal import FINISHED
from rollout.model import RolloutPhase

if TYPE_CHECKING:  # tests/conftest.py imports this module
    from tests.conftest import LocalFleet

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


# -- waiting on a condition ---------------------------------------------------------------
def _timed_out(what: str, timeout: float, last: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")


def wait_for(
    cond: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "the condition",
    *,
    ignore: tuple[type[BaseException], ...] = (),
    done: Callable[[T], bool] = bool,
) -> T:
    """Call `cond` until `done(value)` (truthy by default) and return that value; raise
    AssertionError naming `what` and the last value seen (or exception in `ignore`
    raised) once `timeout` seconds have passed. For plain, blocking code."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = cond()
        except ignore as exc:
            last = exc
        else:
            if done(value):
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        time.sleep(interval)  # polling for the condition


@overload
async def wait_for_async(
    cond: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
    *,
    ignore: tuple[type[BaseException], ...] = ...,
    done: Callable[[T], bool] = ...,
) -> T: ...
@overload
async def wait_for_async(
    cond: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
    *,
    ignore: tuple[type[BaseException], ...] = ...,
    done: Callable[[T], bool] = ...,
) -> T: ...
async def wait_for_async(
    cond: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "the condition",
    *,
    ignore: tuple[type[BaseException], ...] = (),
    done: Callable[[Any], bool] = bool,
) -> Any:
    """`wait_for` on the running loop: `cond` may be a coroutine function (awaited each
    time); between tries the loop runs on. Deadlines are wall-clock seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = cond()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            last = exc
        else:
            if done(value):
                return value
            last = value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last)
        await asyncio.sleep(interval)  # polling for the condition


# -- the CLI as a user runs it --------------------------------------------------------------
FAST_POLICY: dict[str, Any] = {
    "activation": "reboot",
    "batches": {"canary": 1, "size": "50%", "max_unavailable": "50%"},
    "health": {
        "checks": [{"type": "http", "port": 8080, "path": "/healthz"}, {"type": "agent"}],
        "interval": "200ms",
        "min_healthy_time": "600ms",
        "deadline": "15s",
        "boot_timeout": "20s",
        "failure_threshold": 4,
    },
    "failure": {"max_failed": 0, "action": "rollback"},
}


def rollout(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rollout", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def write_policy(tmp_path: Path, data: dict[str, Any] = FAST_POLICY) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def status_json(inventory: Path) -> dict[str, dict[str, Any]]:
    proc = rollout("status", "--inventory", str(inventory), "--output", "json")
    assert proc.returncode == 0, proc.stderr
    return {row["node"]: row for row in json.loads(proc.stdout)["nodes"]}


def gated(*gates: dict[str, Any], **over: Any) -> dict[str, Any]:
    """FAST_POLICY with these gates (and `over`), canary then halves."""
    data = dict(FAST_POLICY, gates=list(gates)) | over
    data.setdefault("batches", {"canary": 1, "size": "50%", "max_unavailable": "50%"})
    return data


def run_cmd(fl: LocalFleet, policy: Path, image: str, tmp: Path, *extra: str) -> list[str]:
    """The `rollout run` command line over a local fleet, its state in `tmp`."""
    return [
        sys.executable, "-m", "rollout", "run", "--inventory", str(fl.inventory),
        "--policy", str(policy), "--image", image, "--state", str(tmp / "state.db"),
        "--log-format", "json", "--output", "json", *extra,
    ]  # fmt: skip


def journal_gates(state: Path) -> list[dict[str, Any]]:
    """The gate events of the first rollout in a state file (none if there is none)."""
    from rollout.journal import SQLiteStore, fold

    if not state.exists():
        return []
    store = SQLiteStore(state)
    try:
        ids = store.rollout_ids()
        return fold(store.entries(ids[0])).to_json()["gates"] if ids else []
    finally:
        store.close()


def fold_id(state: Path) -> str:
    """The id of the first rollout in a state file."""
    from rollout.journal import SQLiteStore

    store = SQLiteStore(state)
    try:
        return store.rollout_ids()[0]
    finally:
        store.close()


# -- the command table ----------------------------------------------------------------------
# docs/controller-api.md, "Commands": the phases in which each command is legal, for a
# rollout whose engine is not running and that has a committed node. Retry also takes a
# paused one (stopped with --stop-after): the controller's own message says so ("... or
# stopped (paused) rollouts"). test_promises.py holds the controller to it, test_api.py
# the HTTP answers (202 or 409).
_P = RolloutPhase
LEGAL_IDLE: dict[str, frozenset[RolloutPhase]] = {
    "pause": frozenset({_P.RUNNING, _P.WAITING, _P.PENDING}),
    "resume": frozenset({_P.PAUSED}),
    "abort": frozenset(set(_P) - FINISHED),
    "retry": frozenset({_P.PAUSED, _P.HALTED, _P.ABORTED, _P.FAILED, _P.ROLLED_BACK}),
    "rollback": frozenset(set(_P) - {_P.ROLLED_BACK, _P.ROLLING_BACK}),
}


# -- `rollout serve` as a process ---------------------------------------------------------
TERMINAL = {"succeeded", "halted", "rolled_back", "aborted", "failed"}


class RolloutCalls:
    """The rollout reads both API test harnesses share, over their own `call`: the
    in-process app (tests/test_api.py) and `rollout serve` as a process (Service)."""

    poll_interval = 0.1  # seconds between reads while waiting for a phase
    phase_timeout = 90.0  # seconds to wait for one

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = "default"
    ) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    async def rollout(self, rollout_id: str) -> dict[str, Any]:
        status, answer = await self.call("GET", f"/v1/rollouts/{rollout_id}")
        assert status == 200, answer
        return answer

    async def wait_phase(
        self, rollout_id: str, phases: set[str], timeout: float | None = None
    ) -> dict[str, Any]:
        return await wait_for_async(
            lambda: self.rollout(rollout_id), timeout or self.phase_timeout, self.poll_interval,
            what=f"rollout {rollout_id} in one of {sorted(phases)}",
            done=lambda answer: answer["phase"] in phases,
        )  # fmt: skip

    async def events(self, rollout_id: str, after: int | None = None) -> list[dict[str, Any]]:
        query = "" if after is None else f"?after={after}"
        status, answer = await self.call("GET", f"/v1/rollouts/{rollout_id}/events{query}")
        assert status == 200, answer
        return list(answer["events"])


@dataclass
class Service(RolloutCalls):
    workdir: Path
    host: str
    token: str
    proc: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)
    args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:7400"

    def start(self) -> None:
        log = self.workdir / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rollout", "serve", "--state",
                 str(self.workdir / "state.db"), "--listen", f"{self.host}:7400",
                 "--token-file", str(self.workdir / "token"), "--log-format", "json",
                 *self.args],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        proc = self.proc

        def listening() -> bool:
            assert proc.poll() is None, log.read_text()
            with socket.create_connection((self.host, 7400), timeout=0.5):
                return True

        wait_for(listening, 20, what="the service to listen", ignore=(OSError,))

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = "default"
    ) -> tuple[int, dict[str, Any]]:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path, json=body, headers=headers) as r,
        ):
            return r.status, await r.json(content_type=None)


def policy_file(tmp_path: Path, **over: Any) -> str:
    data = dict(FAST_POLICY) | over
    path = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def body(fl: LocalFleet, policy: str, image: str, **extra: Any) -> dict[str, Any]:
    """A `POST /v1/rollouts` body over a local fleet."""
    return {"inventory": str(fl.inventory), "policy": policy, "image": image, **extra}


# -- journal entries ----------------------------------------------------------------------
def created_entry(nodes: list[str]) -> CreatedEntry:
    """A rollout's first entry over `nodes`: the first the canary, the rest batch 2."""
    return CreatedEntry(
        policy={},
        image=ImageData(path="v2.img", digest="sha256:00", name="w", version="2", size=1),
        inventory=tuple(InventoryNode(id=n, address=f"{n}:7000") for n in nodes),
        batches=(PlannedBatch(index=1, canary=True, nodes=(nodes[0],)),)
        + ((PlannedBatch(index=2, nodes=tuple(nodes[1:])),) if nodes[1:] else ()),
    )


# -- root filesystem trees and images ------------------------------------------------------
MIB = 1 << 20
SIZE = 16 * MIB
KERNEL = "boot/vmlinuz-6.1.0-test"
INITRD = "boot/initrd.img-6.1.0-test"


def make_tree(root: Path) -> Path:
    """A tiny root tree with Debian-style boot links: one relative, one absolute."""
    (root / "etc").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "etc" / "hostname").write_text("rootfs-test\n")
    (root / KERNEL).write_bytes(b"not really a kernel\n")
    (root / INITRD).write_bytes(b"not really an initrd\n")
    (root / "vmlinuz").symlink_to(KERNEL)
    (root / "initrd.img").symlink_to("/" + INITRD)  # resolved inside the tree, not on the host
    return root


def build(src: Path, out: Path, **kw: object) -> tuple[str, Path]:
    """A rootfs image of `src` (sample-os 1.0.0 for rollout-vm-x86_64 unless `kw` says)."""
    from rollout.rootfs import build_rootfs_image

    args: dict[str, object] = {
        "version": "1.0.0",
        "name": "sample-os",
        "compatible": "rollout-vm-x86_64",
        "units": ["sample-web.service"],
        "size": SIZE,
    }
    args.update(kw)
    img = build_rootfs_image(src, out, **args)  # type: ignore[arg-type]
    return img.digest, Path(img.path)


# -- signing ------------------------------------------------------------------------------
def keys(tmp: Path, name: str) -> tuple[Path, Path]:
    """A fresh ed25519 key pair made by `rollout image keygen`: (private, public)."""
    proc = rollout("image", "keygen", str(tmp / name))
    assert proc.returncode == 0, proc.stderr
    return tmp / f"{name}.key", tmp / f"{name}.pub"


def signed_copy(tmp: Path, image: str, *key_files: Path) -> Path:
    """A copy of `image` in `tmp`, signed with each of `key_files`."""
    copy = tmp / Path(image).name
    copy.write_bytes(Path(image).read_bytes())
    for key in key_files:
        proc = rollout("image", "sign", str(copy), "--key", str(key))
        assert proc.returncode == 0, proc.stderr
    return copy


def seen_at(ready: float) -> float:
    """When the engine's boot polls (rollout.steps.poll_delay) first see a node that is
    back `ready` seconds after its activation was sent."""
    from rollout.steps import poll_delay

    t = 0.0
    while t < ready:
        t += poll_delay(t)
    return t


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on (bound once, then closed)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def read_request(reader: asyncio.StreamReader) -> str:
    """For raw test servers: one HTTP request's method and path; its body (by
    Content-Length) is read and dropped."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    method, path, _ = head.split(" ", 2)
    return f"{method} {path}"
