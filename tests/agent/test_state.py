"""Table tests of the agent's pure slot state machine (rollout.agent.state)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from rollout.agent import state as sm
from rollout.agent.state import (
    AgentError,
    AgentState,
    BootPlan,
    FallbackReason,
    FellBack,
    Lease,
    PendingBoot,
    Slot,
    SlotImage,
)
from rollout.agent.store import Store
from rollout.model import ActivationMode

REBOOT, KEXEC, SOFT = ActivationMode.REBOOT, ActivationMode.KEXEC, ActivationMode.SOFT_REBOOT
V1 = SlotImage("sha256:" + "1" * 64, "web", "1.0.0", good=True)
V2 = SlotImage("sha256:" + "2" * 64, "web", "2.0.0", good=False)
NOW, DEADLINE = 1000.0, 60.0

FACTORY = sm.factory_state(V1)
STAGED = sm.finish_stage(FACTORY, Slot.B, V2)
ACTIVATED = sm.plan_activate(STAGED, REBOOT)  # pending {B, tries 1}
TRYING = sm.begin_boot(ACTIVATED, sm.plan_boot(ACTIVATED))  # tries consumed, not booted yet
UNCOMMITTED = sm.finish_boot(TRYING, sm.plan_boot(ACTIVATED), now=NOW, commit_deadline=DEADLINE)
COMMITTED_B = sm.commit(UNCOMMITTED)


def test_the_fixtures_are_what_their_names_say() -> None:
    assert (STAGED.staged, STAGED.slot_b) == (Slot.B, V2)
    assert ACTIVATED.pending == PendingBoot(Slot.B, 1, REBOOT)
    assert TRYING.pending == PendingBoot(Slot.B, 0, REBOOT) and TRYING.booted == Slot.A
    assert (UNCOMMITTED.booted, UNCOMMITTED.committed, UNCOMMITTED.boot_count) == (
        Slot.B,
        False,
        1,
    )
    assert UNCOMMITTED.commit_deadline_at == NOW + DEADLINE
    assert UNCOMMITTED.staged is None and UNCOMMITTED.tries_left == 0
    assert COMMITTED_B.last_good == Slot.B and COMMITTED_B.slot_b == replace(V2, good=True)


@pytest.mark.parametrize(
    ("name", "state", "expected"),
    [
        (
            "plain start, committed",
            FACTORY,
            BootPlan(Slot.A, None, committed=True, consumes_try=False),
        ),
        (
            "pending activate with a try left",
            ACTIVATED,
            BootPlan(Slot.B, REBOOT, committed=False, consumes_try=True),
        ),
        (
            "try consumed but died before booting",
            TRYING,
            BootPlan(
                Slot.A, None, True, False, FallbackReason.BOOT_TRIES_EXHAUSTED, from_slot=Slot.B
            ),
        ),
        (
            "restart while uncommitted",
            UNCOMMITTED,
            BootPlan(
                Slot.A, None, True, False, FallbackReason.BOOT_TRIES_EXHAUSTED, from_slot=Slot.B
            ),
        ),
        (
            "committed upgrade restarts on itself",
            COMMITTED_B,
            BootPlan(Slot.B, None, committed=True, consumes_try=False),
        ),
        (
            "rollback of a committed upgrade boots committed",
            sm.plan_rollback(COMMITTED_B, KEXEC),
            BootPlan(Slot.A, KEXEC, committed=True, consumes_try=True),
        ),
        (
            "rollback of an uncommitted boot",
            sm.plan_rollback(UNCOMMITTED, SOFT),
            BootPlan(Slot.A, SOFT, committed=True, consumes_try=True),
        ),
        (
            "fallback on the deadline carries its reason",
            sm.plan_fallback(UNCOMMITTED, FallbackReason.COMMIT_DEADLINE),
            BootPlan(Slot.A, REBOOT, True, True, FallbackReason.COMMIT_DEADLINE, Slot.B),
        ),
        (
            "fallback on a failed workload carries its reason",
            sm.plan_fallback(UNCOMMITTED, FallbackReason.WORKLOAD_FAILED),
            BootPlan(Slot.A, REBOOT, True, True, FallbackReason.WORKLOAD_FAILED, Slot.B),
        ),
        (
            "uncommitted without a pending boot (hand-edited) falls back",
            replace(UNCOMMITTED, pending=None),
            BootPlan(
                Slot.A, None, True, False, FallbackReason.BOOT_TRIES_EXHAUSTED, from_slot=Slot.B
            ),
        ),
    ],
)
def test_plan_boot(name: str, state: AgentState, expected: BootPlan) -> None:
    assert sm.plan_boot(state) == expected, name


@pytest.mark.parametrize(
    ("name", "state", "booted", "committed", "last_good", "fell_back", "pending"),
    [
        ("plain start", FACTORY, Slot.A, True, Slot.A, None, None),
        ("activate", ACTIVATED, Slot.B, False, Slot.A, None, PendingBoot(Slot.B, 0, REBOOT)),
        (
            "tries exhausted",
            UNCOMMITTED,
            Slot.A,
            True,
            Slot.A,
            FellBack(Slot.B, V2.digest, FallbackReason.BOOT_TRIES_EXHAUSTED, 2),
            None,
        ),
        (
            "deadline fallback",
            sm.plan_fallback(UNCOMMITTED, FallbackReason.COMMIT_DEADLINE),
            Slot.A,
            True,
            Slot.A,
            FellBack(Slot.B, V2.digest, FallbackReason.COMMIT_DEADLINE, 2),
            None,
        ),
        ("rollback committed", sm.plan_rollback(COMMITTED_B, REBOOT), Slot.A, True, Slot.A,
         None, None),
    ],
)  # fmt: skip
def test_a_whole_boot(
    name: str,
    state: AgentState,
    booted: Slot,
    committed: bool,
    last_good: Slot,
    fell_back: FellBack | None,
    pending: PendingBoot | None,
) -> None:
    plan = sm.plan_boot(state)
    after = sm.finish_boot(sm.begin_boot(state, plan), plan, now=NOW, commit_deadline=DEADLINE)
    assert after.booted == booted, name
    assert after.committed is committed, name
    assert after.last_good == last_good, name
    assert after.fell_back == fell_back, name
    assert after.pending == pending, name
    assert after.boot_count == state.boot_count + 1, name
    assert (after.commit_deadline_at is None) is committed, name
    if committed:
        image = after.slot(booted)
        assert image is not None and image.good, name


def test_begin_boot_persists_the_consumed_try_only_when_there_is_one() -> None:
    assert sm.begin_boot(ACTIVATED, sm.plan_boot(ACTIVATED)).tries_left == 0
    assert sm.begin_boot(FACTORY, sm.plan_boot(FACTORY)) == FACTORY


def test_deadline_is_kept_when_the_same_uncommitted_slot_boots_again() -> None:
    twice = replace(UNCOMMITTED, pending=PendingBoot(Slot.B, 1, REBOOT))
    plan = sm.plan_boot(twice)
    after = sm.finish_boot(twice, plan, now=NOW + 30, commit_deadline=DEADLINE)
    assert after.commit_deadline_at == NOW + DEADLINE


@pytest.mark.parametrize(
    ("name", "state", "expected"),
    [
        ("uncommitted -> last good", UNCOMMITTED, Slot.A),
        ("committed, other good -> other", COMMITTED_B, Slot.A),
        ("factory: other empty", FACTORY, None),
        ("other staged, not good", STAGED, None),
        ("rolled back, B still good", sm.commit(replace(COMMITTED_B, booted=Slot.A)), Slot.B),
    ],
)  # fmt: skip
def test_rollback_target(name: str, state: AgentState, expected: Slot | None) -> None:
    if expected is None:
        with pytest.raises(AgentError) as exc:
            sm.rollback_target(state)
        assert exc.value.code == "nothing_to_roll_back", name
    else:
        assert sm.rollback_target(state) == expected, name


@pytest.mark.parametrize(
    ("name", "state", "digest", "expected"),
    [
        ("fresh -> inactive B", FACTORY, V2.digest, Slot.B),
        ("same digest staged -> not written", STAGED, V2.digest, None),
        ("other digest while staged -> overwrite B", STAGED, "sha256:" + "3" * 64, Slot.B),
        ("booted digest", FACTORY, V1.digest, "already_booted"),
        ("uncommitted", UNCOMMITTED, "sha256:" + "3" * 64, "not_committed"),
        ("committed B -> inactive A", COMMITTED_B, "sha256:" + "3" * 64, Slot.A),
    ],
)
def test_stage_target(name: str, state: AgentState, digest: str, expected: object) -> None:
    if isinstance(expected, str) and expected not in ("A", "B"):
        with pytest.raises(AgentError) as exc:
            sm.stage_target(state, digest)
        assert exc.value.code == expected, name
    else:
        assert sm.stage_target(state, digest) == expected, name


def test_staging_empties_and_marks_not_good() -> None:
    begun = sm.begin_stage(COMMITTED_B, Slot.A)
    assert begun.slot_a is None and begun.staged is None
    done = sm.finish_stage(begun, Slot.A, replace(V1, good=True))
    assert done.slot_a == replace(V1, good=False) and done.staged == Slot.A
    with pytest.raises(ValueError):
        sm.begin_stage(COMMITTED_B, Slot.B)


def test_activate_needs_staged_and_clears_fell_back() -> None:
    with pytest.raises(AgentError) as exc:
        sm.plan_activate(FACTORY, REBOOT)
    assert exc.value.code == "nothing_staged"
    fell = replace(STAGED, fell_back=FellBack(Slot.B, "x", FallbackReason.COMMIT_DEADLINE, 3))
    assert sm.plan_activate(fell, KEXEC).fell_back is None


def test_commit_is_idempotent() -> None:
    assert sm.commit(COMMITTED_B) == COMMITTED_B
    assert sm.commit(FACTORY) == FACTORY


@pytest.mark.parametrize(
    ("mode", "expected"), [(REBOOT, 1.5), (KEXEC, 0.5), (SOFT, 0.0), (None, 0.0)]
)
def test_boot_delay(mode: ActivationMode | None, expected: float) -> None:
    assert sm.boot_delay(mode, firmware=1.0, kernel=0.5) == expected


@pytest.mark.parametrize(
    "state",
    [
        FACTORY,
        STAGED,
        ACTIVATED,
        UNCOMMITTED,
        COMMITTED_B,
        sm.plan_fallback(UNCOMMITTED, FallbackReason.WORKLOAD_FAILED),
        replace(FACTORY, fell_back=FellBack(Slot.B, None, FallbackReason.COMMIT_DEADLINE, 7)),
        replace(UNCOMMITTED, lease=Lease("r1", 1234.5)),
    ],
)
def test_json_round_trip(state: AgentState, tmp_path: Path) -> None:
    assert sm.from_json(json.loads(json.dumps(sm.to_json(state)))) == state
    store = Store(tmp_path)
    store.save(state)
    assert store.load() == state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=99),
        lambda d: d.update(booted="C"),
        lambda d: d.update(committed="yes"),
        lambda d: d.update(boot_count=True),
        lambda d: d["slots"].update(A=None),
        lambda d: d.update(lease="r1"),
        lambda d: d.update(lease={"holder": "r1"}),
        lambda d: d.update(lease={"holder": "r1", "expires_at": "soon"}),
        lambda d: d.update(lease={"holder": 7, "expires_at": 1.0}),
    ],
)
def test_from_json_refuses_bad_state(mutate: object) -> None:
    raw = sm.to_json(FACTORY)
    assert callable(mutate)
    mutate(raw)
    with pytest.raises(ValueError):
        sm.from_json(raw)


def test_a_state_written_before_leases_loads_unleased() -> None:
    raw = sm.to_json(FACTORY)
    del raw["lease"]
    assert sm.from_json(raw) == FACTORY


# --- leases ------------------------------------------------------------------------------

T0 = 1000.0
HELD = replace(FACTORY, lease=Lease("r1", T0 + 30))  # r1 until T0 + 30


@pytest.mark.parametrize(
    ("name", "state", "now", "expected"),
    [
        ("no lease", FACTORY, T0, None),
        ("well before expiry", HELD, T0, Lease("r1", T0 + 30)),
        ("just before expiry", HELD, T0 + 29.999, Lease("r1", T0 + 30)),
        ("at expiry it is gone", HELD, T0 + 30, None),
        ("after expiry", HELD, T0 + 3600, None),
        ("clock before acquire still held", HELD, T0 - 5, Lease("r1", T0 + 30)),
    ],
)
def test_live_lease(name: str, state: AgentState, now: float, expected: Lease | None) -> None:
    assert sm.live_lease(state, now) == expected, name


@pytest.mark.parametrize(
    ("now", "expected"), [(T0, 30.0), (T0 + 12.5, 17.5), (T0 + 30, 0.0), (T0 + 99, 0.0)]
)
def test_expires_in_counts_down_to_zero(now: float, expected: float) -> None:
    assert Lease("r1", T0 + 30).expires_in(now) == expected


@pytest.mark.parametrize(
    ("name", "state", "holder", "ttl", "now", "expected"),
    [
        ("free -> taken", FACTORY, "r1", 30, T0, (Lease("r1", T0 + 30), True)),
        ("renew extends from now", HELD, "r1", 30, T0 + 20, (Lease("r1", T0 + 50), False)),
        ("renew may shorten", HELD, "r1", 5, T0 + 1, (Lease("r1", T0 + 6), False)),
        ("own expired lease -> taken anew", HELD, "r1", 10, T0 + 30, (Lease("r1", T0 + 40), True)),
        ("other's expired lease -> taken", HELD, "r2", 10, T0 + 31, (Lease("r2", T0 + 41), True)),
        ("other's live lease -> leased", HELD, "r2", 10, T0 + 29, "leased"),
    ],
)
def test_acquire_lease(
    name: str, state: AgentState, holder: str, ttl: float, now: float, expected: object
) -> None:
    if expected == "leased":
        with pytest.raises(AgentError) as exc:
            sm.acquire_lease(state, holder, ttl, now=now)
        assert exc.value.code == "leased", name
        assert exc.value.extra == {"holder": "r1", "expires_in": 1.0}, name
        return
    new, acquired = sm.acquire_lease(state, holder, ttl, now=now)
    assert (new.lease, acquired) == expected, name
    assert replace(new, lease=state.lease) == state, "nothing but the lease changes"


@pytest.mark.parametrize(
    ("name", "state", "holder", "now", "expected"),
    [
        ("holder releases", HELD, "r1", T0, True),
        ("no lease", FACTORY, "r1", T0, False),
        ("expired: nothing to release, dropped", HELD, "r1", T0 + 30, False),
        ("other's expired lease: dropped", HELD, "r2", T0 + 30, False),
        ("other's live lease -> leased", HELD, "r2", T0, "leased"),
    ],
)
def test_release_lease(
    name: str, state: AgentState, holder: str, now: float, expected: object
) -> None:
    if expected == "leased":
        with pytest.raises(AgentError) as exc:
            sm.release_lease(state, holder, now=now)
        assert (exc.value.code, exc.value.extra["holder"]) == ("leased", "r1"), name
        return
    new, released = sm.release_lease(state, holder, now=now)
    assert (new.lease, released) == (None, expected), name


@pytest.mark.parametrize(
    ("name", "state", "holder", "now", "refused"),
    [
        ("no lease, no header", FACTORY, None, T0, False),
        ("no lease, any header", FACTORY, "r9", T0, False),
        ("holder", HELD, "r1", T0, False),
        ("no header while leased", HELD, None, T0, True),
        ("other holder while leased", HELD, "r2", T0 + 29.9, True),
        ("holder names differ by case", HELD, "R1", T0, True),
        ("no header after expiry", HELD, None, T0 + 30, False),
        ("other holder after expiry", HELD, "r2", T0 + 30, False),
    ],
)
def test_check_lease(
    name: str, state: AgentState, holder: str | None, now: float, refused: bool
) -> None:
    if refused:
        with pytest.raises(AgentError) as exc:
            sm.check_lease(state, holder, now=now)
        assert exc.value.code == "leased", name
        assert exc.value.extra["holder"] == "r1", name
        assert 0 < exc.value.extra["expires_in"] <= 30, name
    else:
        sm.check_lease(state, holder, now=now)


def test_the_lease_survives_boots_and_transitions() -> None:
    lease = Lease("r1", T0 + 300)
    s = replace(STAGED, lease=lease)
    s = sm.plan_activate(s, REBOOT)
    plan = sm.plan_boot(s)
    s = sm.finish_boot(sm.begin_boot(s, plan), plan, now=T0, commit_deadline=DEADLINE)
    assert s.booted == Slot.B and s.lease == lease
    assert sm.commit(s).lease == lease
    fell = sm.plan_fallback(s, FallbackReason.WORKLOAD_FAILED)
    plan = sm.plan_boot(fell)
    assert sm.finish_boot(fell, plan, now=T0, commit_deadline=DEADLINE).lease == lease


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1.0),
        (30, 30.0),
        (2.5, 2.5),
        (3600, 3600.0),
        (0, None),
        (0.5, None),
        (3601, None),
        (-1, None),
        (True, None),
        ("30", None),
        (None, None),
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_lease_ttl(value: object, expected: float | None) -> None:
    if expected is None:
        with pytest.raises(AgentError) as exc:
            sm.lease_ttl(value)
        assert (exc.value.code, exc.value.extra) == ("bad_request", {"field": "ttl"})
    else:
        assert sm.lease_ttl(value) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("r1", True),
        ("3f2a9c1b7d4e", True),
        ("x" * 128, True),
        ("rollout:web/canary@2", True),
        ("", False),
        ("x" * 129, False),
        ("has space", False),
        (" r1", False),
        ("tab\there", False),
        ("caf\u00e9", False),
        (7, False),
        (None, False),
    ],
)
def test_lease_holder(value: object, ok: bool) -> None:
    if ok:
        assert sm.lease_holder(value) == value
    else:
        with pytest.raises(AgentError) as exc:
            sm.lease_holder(value)
        assert (exc.value.code, exc.value.extra) == ("bad_request", {"field": "holder"})


# --- real machines: the slot the firmware booted ---------------------------------------
KEXEC_ACTIVATED = sm.plan_activate(STAGED, KEXEC)


@pytest.mark.parametrize(
    ("name", "state", "observed", "expected"),
    [
        (
            "as planned: the activated slot came up",
            ACTIVATED,
            Slot.B,
            sm.plan_boot(ACTIVATED),
        ),
        (
            "power cut before kexec: GRUB booted the good slot",
            KEXEC_ACTIVATED,
            Slot.A,
            BootPlan(
                Slot.A,
                None,
                committed=True,
                consumes_try=False,
                fallback=FallbackReason.BOOT_FAILED,
                from_slot=Slot.B,
            ),
        ),
        (
            "uncommitted reboot, power cycle: GRUB skipped the tried slot",
            UNCOMMITTED,
            Slot.A,
            sm.plan_boot(UNCOMMITTED),  # the plan already says: tries exhausted, A
        ),
        (
            "commit reached GRUB but not the state: the committed slot came up again",
            UNCOMMITTED,
            Slot.B,
            BootPlan(Slot.B, None, committed=False, consumes_try=False),
        ),
        (
            "no pending boot and the good slot: nothing to reconcile",
            COMMITTED_B,
            Slot.B,
            sm.plan_boot(COMMITTED_B),
        ),
    ],
)
def test_reconcile_boot(name: str, state: AgentState, observed: Slot, expected: BootPlan) -> None:
    assert sm.reconcile_boot(state, sm.plan_boot(state), observed) == expected, name


def test_reconcile_boot_refuses_a_slot_the_state_calls_empty() -> None:
    with pytest.raises(ValueError, match="slot B, which the agent's state says is empty"):
        sm.reconcile_boot(FACTORY, sm.plan_boot(FACTORY), Slot.B)


def test_boot_id_survives_the_json_form() -> None:
    s = replace(COMMITTED_B, boot_id="3f1c/2")
    assert sm.from_json(sm.to_json(s)) == s
    assert sm.from_json({**sm.to_json(COMMITTED_B), "boot_id": None}).boot_id is None


def test_the_state_machines_replace_is_dataclasses_replace_for_known_fields() -> None:
    image = sm.SlotImage("sha256:1", "web", "1")
    good = sm.replace(image, good=True, version="2")
    assert good == replace(image, good=True, version="2") and image.good is False
    with pytest.raises(TypeError, match=r"^SlotImage has no field colour, size$"):
        sm.replace(image, size=3, colour="red")
