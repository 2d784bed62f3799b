"""The agent's slot state machine: pure values and pure transitions, no I/O.

The whole persistent state of an agent is one frozen `AgentState`. Every change is a pure
function from one state to the next; the runtime (node.py) persists the result before it
acts on it, so a crash at any point leaves a state from which the next start decides
correctly. Nothing here reads a clock: wall-clock `now` is an argument.

Slots and flags::

    slots      A and B, each empty or holding an image {digest, name, version, good}
    good       the slot was committed at some time and has not been overwritten since
    booted     the slot running now; never written to while booted
    committed  the booted slot has been confirmed (by the controller, or because it was
               booted as a known-good rollback target)
    last_good  the slot to fall back to; equals `booted` whenever `committed`
    staged     the inactive slot, holding a verified image not yet booted (or none)
    pending    a boot asked for but not yet confirmed: {slot, tries_left, mode, rollback}
    lease      the rollout that may drive this node, until a wall-clock expiry (or none)

Boot counting, on every boot (process start or soft reboot), decided by `plan_boot`:

    pending, tries_left > 0   consume one try (persist!), boot pending.slot;
                              committed only if it is a rollback to a good slot
    pending, tries_left == 0  the previous try never got committed: boot last_good,
    or booted uncommitted     committed, fell_back reason "boot_tries_exhausted"
    no pending, committed     boot the booted slot again

    boot_count += 1 on every boot. An uncommitted boot gets a commit deadline (wall-clock,
    persisted); when it passes, or the workload exits before commit, the runtime calls
    `plan_fallback` and reboots: the pending rollback to last_good carries the reason.

Leases ("one rollout per node"): a controller takes a lease `{holder, expires_at}` with a
ttl and renews it; while it is live (`now < expires_at`) the slot-changing requests of
anyone else are refused with `leased`. The lease is part of the persisted state, with an
absolute wall-clock expiry, so it survives a reboot, a kexec and a crash: a node stays
leased to the rollout that rebooted it. An expired lease is as good as none.

Worked example (tries = 1)::

    A good, booted, committed  --stage v2-->        B staged
    --activate reboot-->       pending {B, tries 1}
    process restarts: plan_boot -> consume try: pending {B, tries 0}, boot B uncommitted
    never committed, process restarts again: plan_boot -> tries exhausted:
                               boot A, committed, fell_back {from B, boot_tries_exhausted}
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rollout.model import ActivationMode

STATE_FORMAT = 1
BOOT_TRIES = 1  # tries a pending (non-rollback) boot gets before it counts as failed
LEASE_TTL_MIN = 1.0  # seconds
LEASE_TTL_MAX = 3600.0
LEASE_HOLDER_RE = re.compile(r"^[\x21-\x7e]{1,128}$")  # visible ASCII: it goes in a header


class Slot(enum.StrEnum):
    A = "A"
    B = "B"

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A


class FallbackReason(enum.StrEnum):
    """Why an agent left an uncommitted slot on its own."""

    COMMIT_DEADLINE = "commit_deadline"
    WORKLOAD_FAILED = "workload_failed"
    BOOT_TRIES_EXHAUSTED = "boot_tries_exhausted"
    BOOT_FAILED = "boot_failed"  # a real machine came up on another slot than planned


class Busy(enum.StrEnum):
    STAGING = "staging"
    ACTIVATING = "activating"


class AgentError(Exception):
    """A request the agent refuses; `code` is the stable error code of the HTTP API."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


_T = TypeVar("_T")


def replace(obj: _T, /, **changes: Any) -> _T:
    """`dataclasses.replace` for this module's frozen dataclasses (plain fields, no
    __post_init__), without its per-call field introspection: every transition makes
    one or more, and a simulated fleet of 100,000 nodes makes millions."""
    fields: dict[str, Any] = obj.__dict__
    unknown = changes.keys() - fields.keys()
    if unknown:
        raise TypeError(f"{type(obj).__name__} has no field {', '.join(sorted(unknown))}")
    new = object.__new__(type(obj))
    new.__dict__.update(fields)
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class SlotImage:
    """The image a slot holds."""

    digest: str
    name: str
    version: str
    good: bool = False

    def describe(self, slot: Slot) -> dict[str, Any]:
        return {
            "slot": str(slot),
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
        }


@dataclass(frozen=True)
class PendingBoot:
    """A boot asked for and not yet confirmed.

    `reason` is set when the agent itself falls back (it becomes `fell_back.reason`).
    """

    slot: Slot
    tries_left: int
    mode: ActivationMode
    rollback: bool = False
    reason: FallbackReason | None = None


@dataclass(frozen=True)
class FellBack:
    """The last fallback the agent did on its own since the last activate.

    `boot_count` is the boot count of the boot that landed on the good slot.
    """

    from_slot: Slot
    digest: str | None
    reason: FallbackReason
    boot_count: int


@dataclass(frozen=True)
class Lease:
    """The rollout `holder` may drive this node until `expires_at` (wall-clock epoch s)."""

    holder: str
    expires_at: float

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def expires_in(self, now: float) -> float:
        return max(0.0, self.expires_at - now)


@dataclass(frozen=True)
class AgentState:
    slot_a: SlotImage | None
    slot_b: SlotImage | None
    booted: Slot
    committed: bool
    last_good: Slot
    staged: Slot | None = None
    pending: PendingBoot | None = None
    boot_count: int = 0
    fell_back: FellBack | None = None
    commit_deadline_at: float | None = None  # wall-clock epoch seconds
    lease: Lease | None = None
    boot_id: str | None = None  # real machines: the kernel boot (and soft-reboot) counted last

    def slot(self, slot: Slot) -> SlotImage | None:
        return self.slot_a if slot is Slot.A else self.slot_b

    def with_slot(self, slot: Slot, image: SlotImage | None) -> AgentState:
        return replace(self, slot_a=image) if slot is Slot.A else replace(self, slot_b=image)

    @property
    def inactive(self) -> Slot:
        return self.booted.other

    @property
    def booted_image(self) -> SlotImage:
        image = self.slot(self.booted)
        if image is None:  # an invariant: the booted slot always holds an image
            raise ValueError(f"booted slot {self.booted} holds no image")
        return image

    @property
    def tries_left(self) -> int:
        return self.pending.tries_left if self.pending is not None else 0


def factory_state(image: SlotImage) -> AgentState:
    """A fresh node: `image` installed into slot A, good, booted and committed."""
    return AgentState(
        slot_a=replace(image, good=True),
        slot_b=None,
        booted=Slot.A,
        committed=True,
        last_good=Slot.A,
    )


# --- boot counting ---------------------------------------------------------------------


@dataclass(frozen=True)
class BootPlan:
    """What the next boot does. `mode` is None for a start without a pending boot."""

    slot: Slot
    mode: ActivationMode | None
    committed: bool
    consumes_try: bool
    fallback: FallbackReason | None = None
    from_slot: Slot | None = None


def plan_boot(state: AgentState) -> BootPlan:
    """Decide the next boot from the persisted state (see the module table).

    >>> s = factory_state(SlotImage("sha256:1", "web", "1"))
    >>> plan_boot(s).slot, plan_boot(s).committed
    (<Slot.A: 'A'>, True)
    """
    pending = state.pending
    if pending is not None and pending.tries_left > 0:
        return BootPlan(
            slot=pending.slot,
            mode=pending.mode,
            committed=pending.rollback,
            consumes_try=True,
            fallback=pending.reason,
            from_slot=state.booted if pending.reason is not None else None,
        )
    if pending is not None or not state.committed:
        failed = pending.slot if pending is not None else state.booted
        return BootPlan(
            slot=state.last_good,
            mode=None,
            committed=True,
            consumes_try=False,
            fallback=FallbackReason.BOOT_TRIES_EXHAUSTED,
            from_slot=failed,
        )
    return BootPlan(slot=state.booted, mode=None, committed=True, consumes_try=False)


def reconcile_boot(state: AgentState, plan: BootPlan, observed: Slot) -> BootPlan:
    """The boot that really happened on a real machine, where firmware picks the slot.

    `plan` is what the persisted state expected (`plan_boot`); `observed` is the slot the
    root filesystem was mounted from. When they agree the plan stands. Otherwise:

    - the machine came up on the last good slot (an activation that never happened: a
      power cut before kexec, GRUB skipping a slot it already tried): a committed boot of
      it, recorded as a fallback `boot_failed` from the slot that was expected;
    - it came up on the other slot, which holds an image (GRUB booted a slot whose commit
      was written to its environment but not yet to the state): an uncommitted boot of
      it; the commit deadline then decides, as after any activation;
    - it came up on a slot the state says is empty: ValueError (nothing safe to assume).

    >>> a = factory_state(SlotImage("sha256:1", "os", "1"))
    >>> s = replace(a, slot_b=SlotImage("sha256:2", "os", "2"), staged=Slot.B)
    >>> s = plan_activate(s, ActivationMode.KEXEC)
    >>> p = reconcile_boot(s, plan_boot(s), Slot.A)
    >>> p.slot, p.committed, p.fallback
    (<Slot.A: 'A'>, True, <FallbackReason.BOOT_FAILED: 'boot_failed'>)
    """
    if observed == plan.slot:
        return plan
    if state.slot(observed) is None:
        raise ValueError(
            f"the machine booted slot {observed}, which the agent's state says is empty"
        )
    if observed == state.last_good:
        return BootPlan(
            slot=observed,
            mode=None,
            committed=True,
            consumes_try=False,
            fallback=FallbackReason.BOOT_FAILED,
            from_slot=plan.slot,
        )
    return BootPlan(slot=observed, mode=None, committed=False, consumes_try=False)


def begin_boot(state: AgentState, plan: BootPlan) -> AgentState:
    """Consume a try of the pending boot; persist this BEFORE booting."""
    if plan.consumes_try and state.pending is not None:
        return replace(
            state, pending=replace(state.pending, tries_left=state.pending.tries_left - 1)
        )
    return state


def finish_boot(
    state: AgentState, plan: BootPlan, *, now: float, commit_deadline: float
) -> AgentState:
    """The node now runs `plan.slot`: count the boot, settle flags, set the commit deadline.

    A committed boot clears the pending boot and makes the slot the last good one. An
    uncommitted boot keeps the (spent) pending boot, so a restart before commit falls
    back, and gets a deadline `now + commit_deadline` (kept, not extended, when the same
    uncommitted slot boots again).
    """
    count = state.boot_count + 1
    new = replace(state, booted=plan.slot, committed=plan.committed, boot_count=count)
    if plan.committed:
        image = state.slot(plan.slot)
        if image is not None:
            new = new.with_slot(plan.slot, replace(image, good=True))
        new = replace(new, last_good=plan.slot, pending=None, commit_deadline_at=None)
    else:
        keep = (
            state.booted == plan.slot
            and not state.committed
            and state.commit_deadline_at is not None
        )
        deadline = state.commit_deadline_at if keep else now + commit_deadline
        new = replace(new, commit_deadline_at=deadline)
    if new.staged == plan.slot:
        new = replace(new, staged=None)
    if plan.fallback is not None and plan.from_slot is not None:
        source = state.slot(plan.from_slot)
        new = replace(
            new,
            fell_back=FellBack(
                from_slot=plan.from_slot,
                digest=source.digest if source is not None else None,
                reason=plan.fallback,
                boot_count=count,
            ),
        )
    return new


def boot_delay(mode: ActivationMode | None, *, firmware: float, kernel: float) -> float:
    """Simulated time to boot: reboot = firmware + kernel, kexec = kernel, soft = 0.

    >>> boot_delay(ActivationMode.KEXEC, firmware=1.0, kernel=0.5)
    0.5
    """
    if mode is ActivationMode.REBOOT:
        return firmware + kernel
    if mode is ActivationMode.KEXEC:
        return kernel
    return 0.0


# --- requests ----------------------------------------------------------------------------


def plan_activate(state: AgentState, mode: ActivationMode) -> AgentState:
    """Ask to boot the staged slot (one try). Clears the previous `fell_back` record."""
    if state.staged is None:
        raise AgentError("nothing_staged", "no image is staged; PUT /v1/image first")
    pending = PendingBoot(slot=state.staged, tries_left=BOOT_TRIES, mode=mode)
    return replace(state, pending=pending, fell_back=None)


def rollback_target(state: AgentState) -> Slot:
    """Where a rollback goes: last good if uncommitted, else the other slot if it is good."""
    if not state.committed and state.last_good != state.booted:
        return state.last_good
    other = state.booted.other
    image = state.slot(other)
    if state.committed and image is not None and image.good and state.staged != other:
        return other
    raise AgentError(
        "nothing_to_roll_back",
        f"slot {state.booted} is booted and committed and slot {other} holds no good image",
    )


def plan_rollback(state: AgentState, mode: ActivationMode) -> AgentState:
    """Ask to boot the rollback target; it boots committed (it is known good)."""
    target = rollback_target(state)
    pending = PendingBoot(slot=target, tries_left=BOOT_TRIES, mode=mode, rollback=True)
    return replace(state, pending=pending)


def plan_fallback(state: AgentState, reason: FallbackReason) -> AgentState:
    """The agent gives up on its uncommitted slot: reboot into last good, committed."""
    pending = PendingBoot(
        slot=state.last_good,
        tries_left=BOOT_TRIES,
        mode=ActivationMode.REBOOT,
        rollback=True,
        reason=reason,
    )
    return replace(state, pending=pending)


def commit(state: AgentState) -> AgentState:
    """Confirm the booted slot: good, committed, last good; idempotent."""
    image = state.booted_image
    return replace(
        state.with_slot(state.booted, replace(image, good=True)),
        committed=True,
        last_good=state.booted,
        pending=None,
        commit_deadline_at=None,
    )


# --- leases ------------------------------------------------------------------------------


def lease_holder(value: Any) -> str:
    """Validate a lease holder (a rollout id): 1-128 visible ASCII characters.

    It travels in the `X-Rollout-Lease` header, so it has no spaces or control characters.
    """
    if not isinstance(value, str) or not LEASE_HOLDER_RE.match(value):
        raise AgentError(
            "bad_request",
            f"holder: expected 1-128 visible ASCII characters (no spaces), got {value!r}",
            field="holder",
        )
    return value


def lease_ttl(value: Any) -> float:
    """Validate a lease ttl: a number of seconds from LEASE_TTL_MIN to LEASE_TTL_MAX.

    >>> lease_ttl(30)
    30.0
    """
    if not _is_number(value) or not LEASE_TTL_MIN <= value <= LEASE_TTL_MAX:
        raise AgentError(
            "bad_request",
            f"ttl: expected seconds from {LEASE_TTL_MIN:g} to {LEASE_TTL_MAX:g}, got {value!r}",
            field="ttl",
        )
    return float(value)


def live_lease(state: AgentState, now: float) -> Lease | None:
    """The lease in force at `now`: None when there is none or it has expired.

    >>> s = replace(factory_state(SlotImage("sha256:1", "web", "1")), lease=Lease("r1", 130.0))
    >>> live_lease(s, now=129.5), live_lease(s, now=130.0)
    (Lease(holder='r1', expires_at=130.0), None)
    """
    lease = state.lease
    return lease if lease is not None and lease.live(now) else None


def leased_error(lease: Lease, now: float) -> AgentError:
    """The refusal for anyone but `lease.holder` while the lease is live."""
    left = lease.expires_in(now)
    return AgentError(
        "leased",
        f"the node is leased to rollout {lease.holder!r} for another {left:.1f}s; "
        "wait for it to be released or to expire",
        holder=lease.holder,
        expires_in=round(left, 3),
    )


def acquire_lease(
    state: AgentState, holder: str, ttl: float, *, now: float
) -> tuple[AgentState, bool]:
    """Take or renew the lease for `holder` until `now + ttl`; True when newly taken.

    Renewing sets the expiry to `now + ttl` (it may shorten it). Taking over an expired
    lease, whoever held it, counts as newly taken. Another holder's live lease: `leased`.

    >>> s0 = factory_state(SlotImage("sha256:1", "web", "1"))
    >>> s1, new = acquire_lease(s0, "r1", 30, now=100.0)
    >>> s1.lease, new
    (Lease(holder='r1', expires_at=130.0), True)
    >>> s2, new = acquire_lease(s1, "r1", 30, now=120.0)
    >>> s2.lease, new
    (Lease(holder='r1', expires_at=150.0), False)
    """
    current = live_lease(state, now)
    if current is not None and current.holder != holder:
        raise leased_error(current, now)
    return replace(state, lease=Lease(holder, now + ttl)), current is None


def release_lease(state: AgentState, holder: str, *, now: float) -> tuple[AgentState, bool]:
    """Drop `holder`'s live lease; True when it was released.

    No live lease: nothing to release (False; an expired lease is dropped too). Another
    holder's live lease: `leased`.
    """
    current = live_lease(state, now)
    if current is not None and current.holder != holder:
        raise leased_error(current, now)
    return replace(state, lease=None), current is not None


def check_lease(state: AgentState, holder: str | None, *, now: float) -> None:
    """Refuse (`leased`) a slot-changing request from anyone but the live lease's holder.

    With no live lease anyone may proceed (leases are opt-in); `holder` None is a request
    without the lease header.
    """
    current = live_lease(state, now)
    if current is not None and current.holder != holder:
        raise leased_error(current, now)


# --- staging -----------------------------------------------------------------------------


def stage_target(state: AgentState, digest: str) -> Slot | None:
    """The slot an image with `digest` is written to, or None when it is already staged.

    Refuses the booted image, and refuses any write while the booted slot is uncommitted
    (the inactive slot then holds the last good image, the fallback).
    """
    if state.booted_image.digest == digest:
        raise AgentError("already_booted", f"{digest} is the booted image (slot {state.booted})")
    if not state.committed:
        raise AgentError(
            "not_committed",
            f"slot {state.booted} is booted but not committed; the inactive slot "
            f"{state.inactive} holds the fallback image. Commit or roll back first",
        )
    staged = state.slot(state.staged) if state.staged is not None else None
    if staged is not None and staged.digest == digest:
        return None
    return state.inactive


def begin_stage(state: AgentState, slot: Slot) -> AgentState:
    """Empty `slot` before writing into it (persist this first: a crash leaves it empty)."""
    if slot == state.booted:
        raise ValueError("the booted slot is never written to")
    new = state.with_slot(slot, None)
    return replace(new, staged=None) if state.staged == slot else new


def finish_stage(state: AgentState, slot: Slot, image: SlotImage) -> AgentState:
    """`slot` now holds a verified, unpacked image: it is staged, not good."""
    return replace(state.with_slot(slot, replace(image, good=False)), staged=slot)


# --- JSON form ---------------------------------------------------------------------------


def to_json(state: AgentState) -> dict[str, Any]:
    def img(i: SlotImage | None) -> dict[str, Any] | None:
        if i is None:
            return None
        return {"digest": i.digest, "name": i.name, "version": i.version, "good": i.good}

    p, f, lease = state.pending, state.fell_back, state.lease
    return {
        "format": STATE_FORMAT,
        "slots": {"A": img(state.slot_a), "B": img(state.slot_b)},
        "booted": str(state.booted),
        "committed": state.committed,
        "last_good_slot": str(state.last_good),
        "staged": str(state.staged) if state.staged is not None else None,
        "pending_boot": None
        if p is None
        else {
            "slot": str(p.slot),
            "tries_left": p.tries_left,
            "mode": str(p.mode),
            "rollback": p.rollback,
            "reason": str(p.reason) if p.reason is not None else None,
        },
        "boot_count": state.boot_count,
        "fell_back": None
        if f is None
        else {
            "from_slot": str(f.from_slot),
            "digest": f.digest,
            "reason": str(f.reason),
            "boot_count": f.boot_count,
        },
        "commit_deadline_at": state.commit_deadline_at,
        "lease": None
        if lease is None
        else {"holder": lease.holder, "expires_at": lease.expires_at},
        "boot_id": state.boot_id,
    }


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        raise ValueError(f"{where}.{key}: expected {kind}, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _number(value: Any, where: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


def from_json(raw: Any) -> AgentState:
    """Parse `to_json` output; ValueError names the bad field."""
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
        raise ValueError(f"state: expected an object with format {STATE_FORMAT}")

    def img(v: Any, where: str) -> SlotImage | None:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError(f"{where}: expected an object or null")
        return SlotImage(
            digest=_get(v, "digest", str, where),
            name=_get(v, "name", str, where),
            version=_get(v, "version", str, where),
            good=_get(v, "good", bool, where),
        )

    slots = _get(raw, "slots", dict, "state")
    pending: PendingBoot | None = None
    if (p := raw.get("pending_boot")) is not None:
        if not isinstance(p, dict):
            raise ValueError("state.pending_boot: expected an object or null")
        reason = p.get("reason")
        pending = PendingBoot(
            slot=Slot(_get(p, "slot", str, "state.pending_boot")),
            tries_left=_get(p, "tries_left", int, "state.pending_boot"),
            mode=ActivationMode(_get(p, "mode", str, "state.pending_boot")),
            rollback=_get(p, "rollback", bool, "state.pending_boot"),
            reason=FallbackReason(reason) if reason is not None else None,
        )
    fell_back: FellBack | None = None
    if (f := raw.get("fell_back")) is not None:
        if not isinstance(f, dict):
            raise ValueError("state.fell_back: expected an object or null")
        digest = f.get("digest")
        fell_back = FellBack(
            from_slot=Slot(_get(f, "from_slot", str, "state.fell_back")),
            digest=digest if isinstance(digest, str) else None,
            reason=FallbackReason(_get(f, "reason", str, "state.fell_back")),
            boot_count=_get(f, "boot_count", int, "state.fell_back"),
        )
    lease: Lease | None = None
    if (le := raw.get("lease")) is not None:  # absent in states written before leases
        if not isinstance(le, dict):
            raise ValueError("state.lease: expected an object or null")
        lease = Lease(
            holder=_get(le, "holder", str, "state.lease"),
            expires_at=_number(le.get("expires_at"), "state.lease.expires_at"),
        )
    staged = raw.get("staged")
    deadline = raw.get("commit_deadline_at")
    deadline_at = _number(deadline, "state.commit_deadline_at") if deadline is not None else None
    state = AgentState(
        slot_a=img(slots.get("A"), "state.slots.A"),
        slot_b=img(slots.get("B"), "state.slots.B"),
        booted=Slot(_get(raw, "booted", str, "state")),
        committed=_get(raw, "committed", bool, "state"),
        last_good=Slot(_get(raw, "last_good_slot", str, "state")),
        staged=Slot(staged) if staged is not None else None,
        pending=pending,
        boot_count=_get(raw, "boot_count", int, "state"),
        fell_back=fell_back,
        commit_deadline_at=deadline_at,
        lease=lease,
        boot_id=boot_id if isinstance(boot_id := raw.get("boot_id"), str) else None,
    )
    if state.slot(state.booted) is None:
        raise ValueError(f"state: booted slot {state.booted} holds no image")
    return state
