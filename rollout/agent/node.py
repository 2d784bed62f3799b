"""The agent runtime: applies the pure transitions of state.py, persists, then acts.

What touches the machine is a backend (backend.py): `emulated` (the process is the
machine) or `disk` (a real Linux node: block-device slots, GRUB, systemctl). The runtime
is the same for both: the state machine, persistence, leases, busy, the commit deadline
and the fallback decisions. The text below describes the emulated timeline; on a disk
node a "re-exec" is a real reboot/kexec/soft-reboot (`SwitchResult.WAIT`), the booted
slot is observed rather than planned (`state.reconcile_boot`), and a restart of the agent
within one boot counts nothing.

Rule: every state change goes `new = transition(state)`, `store.save(new)`, then side
effects (start/stop the workload, arm the deadline, re-exec). So after a crash the next
start finds a state that already says what was being done.

Boots:

- On process start, `start()` plans the boot (state.plan_boot), consumes a try and
  persists it, sleeps the simulated boot delay (reboot = firmware + kernel, kexec =
  kernel), finishes the boot, persists, and starts the workload. Only then does the
  caller start listening.
- Reboot and kexec end the process: the runtime records `ExitAction.REEXEC` and sets
  `stopping`; the CLI shuts the server down and calls `os.execv` on the same argv.
- Soft reboot stays in-process: stop the workload, boot, start the workload.

Safety without a controller: an uncommitted boot arms a timer for the persisted wall-clock
commit deadline, and the supervisor reports a workload exit before commit. Either one
calls `_fall_back`, which plans a rollback reboot to the last good slot with a reason.

`busy` serialises the operations that change slots: at most one stage or activation at a
time; the others get AgentError("busy").

Leases: stage, activate, rollback and commit take the caller's lease holder (the
`X-Rollout-Lease` header, or None) and check it against the live lease first, in the same
synchronous step that claims `busy`, so no other request slips in between. Lease changes
made while a switch stops the workload are carried into the state the switch persists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from rollout.agent import state as sm
from rollout.agent.backend import Backend, SwitchResult
from rollout.agent.emulated import EmulatedBackend
from rollout.agent.fetch import FetchProgress, FetchRequest, paced
from rollout.agent.state import AgentError, AgentState, Busy, FallbackReason, Slot
from rollout.agent.status import (
    AgentStatus,
    BackendStatus,
    FellBackStatus,
    FetchStatus,
    LeaseStatus,
    SlotImageStatus,
    WorkloadStatus,
)
from rollout.agent.store import Store
from rollout.errors import InputError
from rollout.model import ActivationMode
from rollout.signing import HEADER as SIGNATURE_HEADER
from rollout.signing import Payload, SignatureError, load_keys
from rollout.signing import decode as decode_signature
from rollout.signing import verify as verify_signature

if TYPE_CHECKING:
    from rollout.agent.disk import DiskConfig

log = structlog.get_logger("rollout.agent")

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ExitAction(enum.StrEnum):
    EXIT = "exit"
    REEXEC = "reexec"


@dataclass(frozen=True)
class AgentConfig:
    host: str
    port: int
    state_dir: Path
    token: str = field(repr=False)
    node_id: str
    image: Path | None = None
    workload_port: int = 8080
    firmware_delay: float = 1.0
    kernel_delay: float = 0.5
    commit_deadline: float = 300.0
    workload_grace: float = 1.0
    disk: DiskConfig | None = None  # set: the disk backend (a real node), else emulated
    trusted_keys: tuple[str, ...] = ()  # public key files: images must be signed by one


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = Store(config.state_dir)
        self._changed = asyncio.Event()  # set and replaced on every change (`changed`)
        self._busy: Busy | None = None
        self.stopping = asyncio.Event()
        self.exit_action = ExitAction.EXIT
        self.backend: Backend = self._make_backend()
        self.trusted = load_keys(config.trusted_keys)
        self._state: AgentState | None = None
        self._deadline: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.fetching: FetchProgress | None = None  # the last pull (POST /v1/fetch)
        self._fetch_task: asyncio.Task[None] | None = None

    def _make_backend(self) -> Backend:
        def committed() -> bool:
            return self.state.committed

        if self.config.disk is not None:
            from rollout.agent.disk import DiskBackend

            return DiskBackend(
                self.config,
                self.config.disk,
                self.store,
                is_committed=committed,
                on_workload_failed=self._workload_failed,
                on_change=self.changed,
            )
        return EmulatedBackend(
            self.config,
            self.store,
            is_committed=committed,
            on_workload_failed=self._workload_failed,
            on_change=self.changed,
        )

    @property
    def state(self) -> AgentState:
        if self._state is None:
            raise RuntimeError("agent not started")
        return self._state

    def _save(self, new: AgentState) -> None:
        self.store.save(new)
        self._state = new
        self.changed()

    @property
    def busy(self) -> Busy | None:
        return self._busy

    @busy.setter
    def busy(self, what: Busy | None) -> None:
        self._busy = what
        self.changed()

    def changed(self) -> None:
        """Something `status()` shows may have changed: wake the long polls
        (`next_change`)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def next_change(self, timeout: float) -> None:
        """Return at the next `changed()`, when the agent starts stopping (a long poll
        must not hold its shutdown), or after `timeout` seconds."""
        if self.stopping.is_set():
            return
        waits = [asyncio.ensure_future(e.wait()) for e in (self._changed, self.stopping)]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task_failed", task=task.get_name(), error=repr(exc))

    # --- boot --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load (or factory-install) the state and boot; returns once the node is up."""
        loaded = await asyncio.to_thread(self.store.load)
        if loaded is None:
            loaded = await asyncio.to_thread(self._factory_install)
        self._state = loaded
        self.fetching = await asyncio.to_thread(self._last_fetch)
        await asyncio.to_thread(self.backend.recover, loaded)
        log.info(
            "agent_start", pid=os.getpid(), node_id=self.config.node_id, backend=self.backend.kind
        )
        identity = await asyncio.to_thread(self.backend.boot_identity)
        if identity is not None and identity == loaded.boot_id:
            # The agent restarted; the machine did not boot: count nothing, resume.
            log.info("agent_restart", boot_id=identity, slot=str(loaded.booted))
            if loaded.pending is not None and loaded.pending.tries_left > 0:
                # A switch was persisted but this boot is still running: it never
                # happened. Whatever the bootloader was told, the next boot is reconciled.
                log.warning("switch_lost", slot=str(loaded.pending.slot))
                self._save(replace(loaded, pending=None))
            await self.backend.after_boot(self.state)
            self._start_workload()
            self._arm_deadline()
            return
        await self._boot(soft=False, identity=identity)

    def _last_fetch(self) -> FetchProgress | None:
        """The last pull, as saved when it ended (None: none, or unreadable)."""
        raw = self.store.load_fetch()
        return FetchProgress.restore(raw) if raw is not None else None

    def _factory_install(self) -> AgentState:
        state = self.backend.factory_state()
        self.store.save(state)
        image = state.booted_image
        log.info(
            "factory_install", slot=str(state.booted), digest=image.digest, version=image.version
        )
        return state

    async def _boot(self, *, soft: bool, identity: str | None = None) -> None:
        plan = sm.plan_boot(self.state)
        observed = await asyncio.to_thread(self.backend.booted_slot)
        if observed is not None:
            try:
                plan = sm.reconcile_boot(self.state, plan, observed)
            except ValueError as exc:
                raise InputError(f"{self.config.state_dir}: {exc}") from exc
        if plan.consumes_try:
            self._save(sm.begin_boot(self.state, plan))
        delay = self.backend.boot_delay(plan.mode, soft)
        if delay:
            await asyncio.sleep(delay)
        new = sm.finish_boot(
            self.state, plan, now=time.time(), commit_deadline=self.config.commit_deadline
        )
        if identity is not None:
            new = replace(new, boot_id=identity)
        self._save(new)
        await self.backend.after_boot(new)
        image = new.booted_image
        log.info(
            "boot",
            slot=str(new.booted),
            version=image.version,
            digest=image.digest,
            mode=str(ActivationMode.SOFT_REBOOT) if soft else (plan.mode and str(plan.mode)),
            boot_delay=round(delay, 3),
            committed=new.committed,
            boot_count=new.boot_count,
            tries_left=new.tries_left,
        )
        if plan.fallback is not None:
            log.warning(
                "fallback",
                reason=str(plan.fallback),
                from_slot=str(plan.from_slot),
                to_slot=str(new.booted),
                boot_count=new.boot_count,
            )
        self._start_workload()
        self._arm_deadline()

    def _start_workload(self) -> None:
        self.backend.start_workload(self.state)

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        at = self.state.commit_deadline_at
        if not self.state.committed and at is not None:
            self._deadline = asyncio.create_task(self._deadline_watch(at), name="deadline")

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    async def _deadline_watch(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.time()))
        if not self.state.committed and self.state.commit_deadline_at == at:
            self._deadline = None
            self._fall_back(FallbackReason.COMMIT_DEADLINE)

    def _workload_failed(self, exit_code: int, ran: float) -> None:
        if not self.state.committed:
            log.warning("workload_failed_before_commit", exit_code=exit_code, ran_s=round(ran, 3))
            self._fall_back(FallbackReason.WORKLOAD_FAILED)

    def _fall_back(self, reason: FallbackReason) -> None:
        """Leave the uncommitted booted slot: reboot into last good (no controller needed)."""
        if self.busy is not None or self.state.committed:
            return
        self.busy = Busy.ACTIVATING
        new = sm.plan_fallback(self.state, reason)
        log.warning(
            "fallback_decided",
            reason=str(reason),
            from_slot=str(self.state.booted),
            to_slot=str(new.last_good),
        )
        self._spawn(self._switch(new), name="fallback")

    async def _switch(self, new: AgentState) -> None:
        """Stop the workload, persist the pending boot, then reboot (re-exec) or soft-boot."""
        pending = new.pending
        if pending is None:
            raise ValueError("switch without a pending boot")
        self._disarm_deadline()
        await self.backend.stop_workload()
        # `new` was planned before the stop; keep a lease taken, renewed or released since.
        self._save(replace(new, lease=self.state.lease))
        log.info("reboot", mode=str(pending.mode), slot=str(pending.slot))
        try:
            result = await self.backend.switch(self.state)
        except AgentError as exc:
            # Nothing was started: the machine still runs the booted slot. Drop the
            # pending boot so the state says so too, and serve again.
            log.error("switch_failed", error=exc.code, message=exc.message)
            self._save(replace(self.state, pending=None))
            self._start_workload()
            self._arm_deadline()
            self.busy = None
            return
        if result is SwitchResult.IN_PROCESS:
            try:
                await self._boot(soft=True)
            finally:
                self.busy = None
        elif result is SwitchResult.REEXEC:
            self.exit_action = ExitAction.REEXEC
            self.stopping.set()
        # WAIT: the machine is going down; the service manager stops this process.

    # --- requests ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """`GET /v1/status` (the model both ends of the API share: agent/status.py)."""
        s = self.state
        staged = s.slot(s.staged) if s.staged is not None else None
        good = s.slot(s.last_good)
        f = s.fell_back
        lease = self._lease_body()
        return AgentStatus(
            node_id=self.config.node_id,
            booted=SlotImageStatus(**s.booted_image.describe(s.booted)),
            staged=SlotImageStatus(**staged.describe(s.staged))
            if staged is not None and s.staged
            else None,
            committed=s.committed,
            last_good_slot=str(s.last_good),
            last_good=SlotImageStatus(**good.describe(s.last_good)) if good is not None else None,
            boot_tries_left=s.tries_left,
            boot_count=s.boot_count,
            workload=WorkloadStatus(**self.backend.workload_snapshot()),
            fell_back=None
            if f is None
            else FellBackStatus(
                from_slot=str(f.from_slot),
                digest=f.digest,
                reason=str(f.reason),
                boot_count=f.boot_count,
            ),
            busy=str(self.busy) if self.busy is not None else None,
            lease=LeaseStatus(**lease) if lease is not None else None,
            backend=BackendStatus(**self.backend.describe()),
            fetch=FetchStatus(**self.fetching.describe()) if self.fetching is not None else None,
        ).model_dump(mode="json", exclude_unset=True)  # the shape as the backend gives it

    def _lease_body(self) -> dict[str, Any] | None:
        now = time.time()
        lease = sm.live_lease(self.state, now)
        if lease is None:
            return None
        return {"holder": lease.holder, "expires_in": round(lease.expires_in(now), 3)}

    # --- leases --------------------------------------------------------------------------

    def acquire_lease(self, holder: str, ttl: float) -> dict[str, Any]:
        """Take or renew the lease (persisted); AgentError leased if another holds it."""
        now = time.time()
        try:
            new, acquired = sm.acquire_lease(self.state, holder, ttl, now=now)
        except AgentError as exc:
            log.info("lease_refused", what="acquire", holder=holder, leased_to=exc.extra["holder"])
            raise
        self._save(new)
        log.info("lease_acquired" if acquired else "lease_renewed", holder=holder, ttl=ttl)
        return {"holder": holder, "expires_in": round(ttl, 3), "acquired": acquired}

    def release_lease(self, holder: str) -> dict[str, Any]:
        now = time.time()
        try:
            new, released = sm.release_lease(self.state, holder, now=now)
        except AgentError as exc:
            log.info("lease_refused", what="release", holder=holder, leased_to=exc.extra["holder"])
            raise
        if new != self.state:
            self._save(new)
        if released:
            log.info("lease_released", holder=holder)
        return {"released": released}

    def check_lease(self, holder: str | None, what: str) -> None:
        """Refuse `what` (AgentError leased) unless there is no live lease or `holder` has it."""
        try:
            sm.check_lease(self.state, holder, now=time.time())
        except AgentError as exc:
            log.info("lease_refused", what=what, holder=holder, leased_to=exc.extra["holder"])
            raise

    def _check_not_busy(self) -> None:
        if self.busy is not None:
            raise AgentError(
                "busy", f"the agent is busy {self.busy}; retry later", busy=str(self.busy)
            )

    def _claim(self, what: Busy) -> None:
        self._check_not_busy()
        self.busy = what

    def _check_signature(self, signature: str | None, digest: str) -> Payload | None:
        """With trusted keys: the signed payload, verified before a byte is read."""
        if not self.trusted:
            return None
        kind = "rootfs" if self.backend.kind == "disk" else "tree"
        try:
            if signature is None:
                raise SignatureError(
                    "unsigned",
                    f"this node only takes signed images ({SIGNATURE_HEADER} is missing)",
                )
            payload = verify_signature(decode_signature(signature), self.trusted, digest=digest)
            if payload.kind != kind:
                raise SignatureError(
                    "bad_signature", f"the signature is for a {payload.kind} image; this node "
                    f"takes {kind} images",
                )  # fmt: skip
            node_compatible = self.config.disk.compatible if self.config.disk else None
            if node_compatible is not None and payload.compatible != node_compatible:
                raise SignatureError(
                    "bad_signature", f"the signature is for {payload.compatible!r} images; "
                    f"this node is {node_compatible!r}",
                )  # fmt: skip
        except SignatureError as exc:
            log.warning("stage_refused", error=exc.code, message=str(exc), digest=digest)
            raise AgentError(exc.code, str(exc), written=False) from None
        return payload

    async def stage(
        self,
        digest: str,
        body: AsyncIterable[bytes],
        *,
        lease: str | None = None,
        signature: str | None = None,
    ) -> dict[str, Any]:
        """Stream an image into the inactive slot, verify `digest`, unpack, stage it."""
        self.check_lease(lease, "stage")
        if not DIGEST_RE.match(digest):
            raise AgentError(
                "bad_request",
                "X-Image-Digest: expected 'sha256:' and 64 lowercase hex digits",
                field="X-Image-Digest",
            )
        payload = self._check_signature(signature, digest)
        self._check_not_busy()
        slot = sm.stage_target(self.state, digest)
        if slot is None:
            async for _ in body:
                pass
            return self._already_staged(digest)
        self._claim(Busy.STAGING)
        try:
            return await self._write_slot(slot, digest, body, payload)
        finally:
            self.busy = None

    def _already_staged(self, digest: str) -> dict[str, Any]:
        """The answer to staging the image that is already staged: nothing written."""
        staged = self.state.staged
        image = self.state.slot(staged) if staged is not None else None
        if staged is None or image is None:
            raise RuntimeError("staged slot vanished")
        log.info("stage_skipped", slot=str(staged), digest=digest)
        return {**_stage_body(staged, image), "bytes": 0, "written": False}

    async def _write_slot(
        self, slot: Slot, digest: str, body: AsyncIterable[bytes], payload: Payload | None
    ) -> dict[str, Any]:
        before = self.state
        self._save(sm.begin_stage(self.state, slot))
        log.info("stage_begin", slot=str(slot), digest=digest)
        ok = False
        try:
            try:
                image, size = await self.backend.write_slot(self.state, slot, digest, body)
            except AgentError as exc:
                log.warning(
                    "stage_refused" if exc.code != "digest_mismatch" else "stage_digest_mismatch",
                    slot=str(slot),
                    error=exc.code,
                    message=exc.message,
                )
                if exc.extra.get("written") is False:
                    # Refused before the slot was touched: it still holds what it held.
                    self._save(replace(before, lease=self.state.lease))
                    ok = True
                raise
            if payload is not None and (payload.name, payload.version) != (
                image.name,
                image.version,
            ):
                log.warning("stage_refused", slot=str(slot), error="bad_signature")
                raise AgentError(
                    "bad_signature",
                    f"the signature is for {payload.name} {payload.version}; the image is "
                    f"{image.name} {image.version}",
                )
            self._save(sm.finish_stage(self.state, slot, image))
            ok = True
        finally:
            if not ok:
                await asyncio.to_thread(self.backend.clear_slot, slot)
        log.info("stage", slot=str(slot), digest=digest, version=image.version, bytes=size)
        return {**_stage_body(slot, image), "bytes": size, "written": True}

    async def fetch(
        self, request: FetchRequest, *, lease: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Start pulling an image into the inactive slot; (202, progress) while it runs.

        The same digest while it is being fetched joins that fetch; one already staged
        answers 200 with `written: false`. The signature is checked before anything."""
        self.check_lease(lease, "stage")
        digest = request.digest
        payload = self._check_signature(request.signature, digest)
        current = self.fetching
        if current is not None and current.state == "fetching" and current.digest == digest:
            return 202, current.describe()
        self._check_not_busy()
        slot = sm.stage_target(self.state, digest)
        if slot is None:
            return 200, self._already_staged(digest)
        ssl_context = request.ssl_context()  # a bad CA is a 400 before the slot is claimed
        self._claim(Busy.STAGING)
        progress = FetchProgress(digest=digest, size=request.size, url=request.url)
        self.fetching = progress
        log.info("fetch_begin", slot=str(slot), digest=digest, url=request.url, size=request.size)
        self._fetch_task = asyncio.create_task(
            self._pull(slot, request, ssl_context, progress, payload), name="fetch"
        )
        self._tasks.add(self._fetch_task)
        self._fetch_task.add_done_callback(self._task_done)
        return 202, progress.describe()

    async def _pull(
        self,
        slot: Slot,
        request: FetchRequest,
        ssl_context: Any,
        progress: FetchProgress,
        payload: Payload | None,
    ) -> None:
        import aiohttp

        from rollout.oci import Credentials, FetchError, RegistryClient

        auth = request.auth
        credentials = Credentials(auth.username, auth.password.get_secret_value()) if auth else None

        def resumed(offset: int, exc: BaseException) -> None:
            progress.resumes += 1
            log.warning("fetch_resume", digest=request.digest, offset=offset, error=repr(exc))

        async def body() -> AsyncIterator[bytes]:
            async with aiohttp.ClientSession() as session:
                client = RegistryClient(session, credentials=credentials, ssl=ssl_context)
                client.allow(request.url)
                chunks = client.fetch(
                    request.url, digest=request.digest, size=request.size, on_resume=resumed
                )
                try:
                    async for chunk in paced(chunks, request.rate_limit):
                        progress.bytes += len(chunk)
                        yield chunk
                except FetchError as exc:
                    raise AgentError(f"fetch_{exc.code}", exc.message) from None

        try:
            result = await self._write_slot(slot, request.digest, body(), payload)
            progress.state = "staged"
            log.info(
                "fetch", digest=request.digest, bytes=result["bytes"], resumes=progress.resumes
            )
        except AgentError as exc:
            progress.state, progress.error = "failed", {"code": exc.code, "message": exc.message}
            log.warning("fetch_failed", digest=request.digest, error=exc.code, message=exc.message)
        except asyncio.CancelledError:
            progress.state = "failed"
            progress.error = {"code": "cancelled", "message": "the fetch was cancelled"}
            raise
        except Exception as exc:
            progress.state = "failed"
            progress.error = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            log.exception("fetch_failed", digest=request.digest)
        finally:
            progress.finished = time.time()
            self.busy = None
            self._fetch_task = None
            # Kept across boots: the node reboots into what it fetched right after.
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.store.save_fetch, progress.describe())

    async def discard(self, digest: str, *, lease: str | None = None) -> dict[str, Any]:
        """Drop a staged (or still fetching) image that will not be activated: the
        controller abandoned it, e.g. a pre-staged node of a rollout that halted."""
        self.check_lease(lease, "stage")
        task, current = self._fetch_task, self.fetching
        if task is not None and current is not None and current.digest == digest:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            log.info("fetch_cancelled", digest=digest)
            return {"discarded": True, "digest": digest}
        self._check_not_busy()
        staged = self.state.staged
        image = self.state.slot(staged) if staged is not None else None
        if staged is None or image is None or image.digest != digest:
            return {"discarded": False, "digest": digest}
        self._save(sm.begin_stage(self.state, staged))
        await asyncio.to_thread(self.backend.clear_slot, staged)
        log.info("discard", slot=str(staged), digest=digest)
        return {"discarded": True, "digest": digest}

    def prepare_activate(
        self, mode: ActivationMode, *, lease: str | None = None
    ) -> tuple[dict[str, Any], AgentState]:
        """Validate an activate; claim `busy`. Call `begin_switch` once the 202 is sent."""
        self.check_lease(lease, "activate")
        self._check_not_busy()
        new = sm.plan_activate(self.state, mode)
        return self._prepared("activate", new, mode)

    def prepare_rollback(
        self, mode: ActivationMode, *, lease: str | None = None
    ) -> tuple[dict[str, Any], AgentState]:
        self.check_lease(lease, "rollback")
        self._check_not_busy()
        new = sm.plan_rollback(self.state, mode)
        return self._prepared("rollback", new, mode)

    def _prepared(
        self, what: str, new: AgentState, mode: ActivationMode
    ) -> tuple[dict[str, Any], AgentState]:
        self._claim(Busy.ACTIVATING)
        pending = new.pending
        if pending is None:
            raise RuntimeError("planned switch without a pending boot")
        log.info(what, slot=str(pending.slot), mode=str(mode), boot_count=self.state.boot_count)
        body = {
            "booting": str(pending.slot),
            "mode": str(mode),
            "boot_count": self.state.boot_count,
        }
        return body, new

    def begin_switch(self, new: AgentState) -> None:
        self._spawn(self._switch(new), name="switch")

    async def commit(self, *, lease: str | None = None) -> dict[str, Any]:
        self.check_lease(lease, "commit")
        if self.busy is Busy.ACTIVATING:
            raise AgentError("busy", "the agent is busy activating; retry later", busy="activating")
        if not self.state.committed or self.state.pending is not None:
            self._disarm_deadline()
            new = sm.commit(self.state)
            # The bootloader first: a crash between the two boots the committed slot.
            await self.backend.commit(new)
            self._save(new)
            log.info("commit", slot=str(self.state.booted), digest=self.state.booted_image.digest)
        return self.status()

    # --- shutdown ----------------------------------------------------------------------

    def request_exit(self) -> None:
        log.info("shutdown_requested")
        self.stopping.set()

    async def close(self) -> None:
        """Stop timers, background tasks and the workload (no orphan processes)."""
        self._disarm_deadline()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.stop_workload()


def _stage_body(slot: Slot, image: sm.SlotImage) -> dict[str, Any]:
    return {"slot": str(slot), "digest": image.digest, "version": image.version, "name": image.name}
