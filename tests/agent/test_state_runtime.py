"""The agent's slot state machine, every transition made inside the test that checks it.

tests/agent/test_state.py builds its states at import time (module constants and
parametrize lists). Mutation testing (`make mutate`) turns a mutant on only while a test
runs, so a transition computed at import is invisible to it. Here each transition runs in
the test body and is compared as a whole state; the refusals carry their exact messages
(the agent API returns them), and a corrupt state file is refused naming the bad field.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import pytest

from rollout.agent import state as sm
from rollout.agent.state import (
    BOOT_TRIES,
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
from rollout.model import ActivationMode

REBOOT, KEXEC, SOFT = ActivationMode.REBOOT, ActivationMode.KEXEC, ActivationMode.SOFT_REBOOT
V1 = SlotImage("sha256:" + "1" * 64, "web", "1.0.0", good=True)
V2 = SlotImage("sha256:" + "2" * 64, "web", "2.0.0", good=False)
V3 = SlotImage("sha256:" + "3" * 64, "web", "3.0.0", good=False)
NOW, DEADLINE = 1000.0, 60.0


def upgraded() -> dict[str, AgentState]:
    """v1 in A, then v2 staged into B, activated, booted on trial and committed."""
    factory = sm.factory_state(replace(V1, good=False))  # the factory image counts as good
    staged = sm.finish_stage(factory, Slot.B, V2)
    activated = sm.plan_activate(staged, REBOOT)
    plan = sm.plan_boot(activated)
    trying = sm.begin_boot(activated, plan)
    uncommitted = sm.finish_boot(trying, plan, now=NOW, commit_deadline=DEADLINE)
    return {
        "factory": factory,
        "staged": staged,
        "activated": activated,
        "trying": trying,
        "uncommitted": uncommitted,
        "committed": sm.commit(uncommitted),
    }


def test_an_upgrade_step_by_step_as_whole_states() -> None:
    s = upgraded()
    factory = AgentState(slot_a=V1, slot_b=None, booted=Slot.A, committed=True, last_good=Slot.A)
    assert s["factory"] == factory
    assert s["staged"] == replace(factory, slot_b=V2, staged=Slot.B)
    assert s["activated"] == replace(s["staged"], pending=PendingBoot(Slot.B, BOOT_TRIES, REBOOT))
    assert s["trying"] == replace(s["activated"], pending=PendingBoot(Slot.B, 0, REBOOT))
    assert s["uncommitted"] == AgentState(
        slot_a=V1,
        slot_b=V2,
        booted=Slot.B,
        committed=False,
        last_good=Slot.A,
        staged=None,
        pending=PendingBoot(Slot.B, 0, REBOOT),
        boot_count=1,
        commit_deadline_at=NOW + DEADLINE,
    )
    assert s["committed"] == replace(
        s["uncommitted"],
        slot_b=replace(V2, good=True),
        committed=True,
        last_good=Slot.B,
        pending=None,
        commit_deadline_at=None,
    )
    assert sm.commit(s["committed"]) == s["committed"]  # idempotent


def test_activate_carries_its_mode_and_forgets_the_last_fallback() -> None:
    staged = upgraded()["staged"]
    fell = FellBack(Slot.B, V3.digest, FallbackReason.COMMIT_DEADLINE, 4)
    activated = sm.plan_activate(replace(staged, fell_back=fell), KEXEC)
    assert activated == replace(staged, pending=PendingBoot(Slot.B, BOOT_TRIES, KEXEC))


def test_activate_without_a_staged_image_is_refused() -> None:
    with pytest.raises(AgentError) as err:
        sm.plan_activate(upgraded()["factory"], REBOOT)
    assert (err.value.code, err.value.message) == (
        "nothing_staged",
        "no image is staged; PUT /v1/image first",
    )


def test_a_try_is_consumed_only_by_a_plan_that_consumes_one() -> None:
    trying = upgraded()["trying"]
    exhausted = sm.plan_boot(trying)  # tries spent: a fallback, which consumes none
    assert not exhausted.consumes_try
    assert sm.begin_boot(trying, exhausted) == trying


def test_rollback_and_fallback_plans_as_whole_states() -> None:
    s = upgraded()
    committed, uncommitted = s["committed"], s["uncommitted"]
    assert sm.plan_rollback(committed, KEXEC) == replace(
        committed, pending=PendingBoot(Slot.A, BOOT_TRIES, KEXEC, rollback=True)
    )
    assert sm.plan_rollback(uncommitted, SOFT) == replace(
        uncommitted, pending=PendingBoot(Slot.A, BOOT_TRIES, SOFT, rollback=True)
    )
    for reason in FallbackReason:
        assert sm.plan_fallback(uncommitted, reason) == replace(
            uncommitted,
            pending=PendingBoot(Slot.A, BOOT_TRIES, REBOOT, rollback=True, reason=reason),
        )


def test_nothing_to_roll_back() -> None:
    s = upgraded()
    message = "slot {} is booted and committed and slot {} holds no good image"
    cases = [
        (s["factory"], message.format("A", "B")),  # slot B empty
        (s["staged"], message.format("A", "B")),  # B holds an image, not a good one
        # After committing v2 in B, staging began over v1 in A: nothing good to return to.
        (sm.begin_stage(s["committed"], Slot.A), message.format("B", "A")),
        # Uncommitted, but its last good slot is itself (a hand-edited state).
        (replace(s["uncommitted"], last_good=Slot.B), message.format("B", "A")),
    ]
    for state, text in cases:
        with pytest.raises(AgentError) as err:
            sm.rollback_target(state)
        assert (err.value.code, err.value.message) == ("nothing_to_roll_back", text)


def test_a_committed_boot_marks_its_image_good_and_unstages_it() -> None:
    staged = upgraded()["staged"]
    plan = BootPlan(Slot.B, KEXEC, committed=True, consumes_try=True)
    after = sm.finish_boot(staged, plan, now=NOW, commit_deadline=DEADLINE)
    assert after == replace(
        staged, slot_b=replace(V2, good=True), booted=Slot.B, last_good=Slot.B, staged=None,
        boot_count=1,
    )  # fmt: skip
    # The same into slot A: v2 committed in B, v3 staged into A, booted committed.
    on_b = sm.finish_stage(upgraded()["committed"], Slot.A, V3)
    plan = BootPlan(Slot.A, KEXEC, committed=True, consumes_try=True)
    after = sm.finish_boot(on_b, plan, now=NOW, commit_deadline=DEADLINE)
    assert after == replace(
        on_b, slot_a=replace(V3, good=True), booted=Slot.A, last_good=Slot.A, staged=None,
        boot_count=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "booted", "committed", "deadline", "plan_slot", "expected"),
    [
        ("first trial boot", Slot.A, True, None, Slot.B, NOW + 30 + DEADLINE),
        ("the same trial slot boots again: kept", Slot.B, False, NOW, Slot.B, NOW),
        ("another slot boots on trial: a fresh one", Slot.B, False, NOW, Slot.A,
         NOW + 30 + DEADLINE),
        ("a committed slot boots on trial: a fresh one", Slot.A, True, NOW, Slot.A,
         NOW + 30 + DEADLINE),
    ],
)  # fmt: skip
def test_commit_deadline_of_an_uncommitted_boot(
    name: str,
    booted: Slot,
    committed: bool,
    deadline: float | None,
    plan_slot: Slot,
    expected: float,
) -> None:
    state = AgentState(V1, V2, booted, committed, Slot.A, commit_deadline_at=deadline)
    plan = BootPlan(plan_slot, None, committed=False, consumes_try=False)
    after = sm.finish_boot(state, plan, now=NOW + 30, commit_deadline=DEADLINE)
    assert after.commit_deadline_at == expected, name
    assert (after.booted, after.committed, after.boot_count) == (plan_slot, False, 1), name


def test_a_fallback_names_the_image_it_left() -> None:
    committed = upgraded()["committed"]  # v2 committed in B; now v3 into A, on trial
    trial = sm.finish_stage(committed, Slot.A, V3)
    trial = sm.plan_activate(trial, REBOOT)
    plan = sm.plan_boot(trial)
    trial = sm.finish_boot(sm.begin_boot(trial, plan), plan, now=NOW, commit_deadline=DEADLINE)
    assert (trial.booted, trial.committed, trial.last_good) == (Slot.A, False, Slot.B)
    back = sm.plan_fallback(trial, FallbackReason.WORKLOAD_FAILED)
    plan = sm.plan_boot(back)
    after = sm.finish_boot(sm.begin_boot(back, plan), plan, now=NOW + 5, commit_deadline=DEADLINE)
    assert after.fell_back == FellBack(Slot.A, V3.digest, FallbackReason.WORKLOAD_FAILED, 3)
    assert (after.booted, after.committed, after.pending) == (Slot.B, True, None)


def test_a_fallback_from_an_emptied_slot_names_no_image() -> None:
    state = AgentState(V1, None, Slot.A, True, Slot.A, boot_count=2)
    plan = BootPlan(Slot.A, None, True, False, FallbackReason.BOOT_FAILED, from_slot=Slot.B)
    after = sm.finish_boot(state, plan, now=NOW, commit_deadline=DEADLINE)
    assert after.fell_back == FellBack(Slot.B, None, FallbackReason.BOOT_FAILED, 3)


def test_reconcile_with_an_empty_observed_slot_is_refused() -> None:
    emptied = sm.begin_stage(upgraded()["committed"], Slot.A)  # v2 booted in B; A emptied
    with pytest.raises(ValueError, match="booted slot A, which the agent's state says is empty"):
        sm.reconcile_boot(emptied, sm.plan_boot(emptied), Slot.A)


def test_staging_refusals_and_targets() -> None:
    s = upgraded()
    with pytest.raises(AgentError) as err:
        sm.stage_target(s["factory"], V1.digest)
    assert (err.value.code, err.value.message) == (
        "already_booted",
        f"{V1.digest} is the booted image (slot A)",
    )
    with pytest.raises(AgentError) as err:
        sm.stage_target(s["uncommitted"], V3.digest)
    assert (err.value.code, err.value.message) == (
        "not_committed",
        "slot B is booted but not committed; the inactive slot A holds the fallback image. "
        "Commit or roll back first",
    )
    assert sm.stage_target(s["staged"], V2.digest) is None  # already staged
    assert sm.stage_target(s["staged"], V3.digest) is Slot.B  # replaces the staged one
    assert sm.stage_target(s["factory"], V2.digest) is Slot.B
    on_b = sm.finish_stage(s["committed"], Slot.A, V3)  # v2 booted in B, v3 staged in A
    assert sm.stage_target(on_b, V3.digest) is None
    assert sm.stage_target(on_b, V1.digest) is Slot.A
    # Slot B holds v2 but is not staged (its staging never finished): written again.
    assert sm.stage_target(replace(s["staged"], staged=None), V2.digest) is Slot.B


def test_begin_stage_empties_the_slot_and_unstages_only_that_one() -> None:
    s = upgraded()
    assert sm.begin_stage(s["staged"], Slot.B) == replace(s["staged"], slot_b=None, staged=None)
    committed = s["committed"]  # B booted; A holds v1, not staged
    assert sm.begin_stage(committed, Slot.A) == replace(committed, slot_a=None)
    with pytest.raises(ValueError, match=r"^the booted slot is never written to$"):
        sm.begin_stage(committed, Slot.B)


def test_lease_refusals() -> None:
    with pytest.raises(AgentError) as err:
        sm.lease_holder("has space")
    assert err.value.body() == {
        "error": "bad_request",
        "message": "holder: expected 1-128 visible ASCII characters (no spaces), got 'has space'",
        "field": "holder",
    }
    with pytest.raises(AgentError) as err:
        sm.lease_ttl(0.5)
    assert err.value.body() == {
        "error": "bad_request",
        "message": "ttl: expected seconds from 1 to 3600, got 0.5",
        "field": "ttl",
    }
    refusal = sm.leased_error(Lease("r-7", NOW + 12.34567), NOW)
    assert str(refusal) == refusal.message
    assert refusal.body() == {
        "error": "leased",
        "message": "the node is leased to rollout 'r-7' for another 12.3s; "
        "wait for it to be released or to expire",
        "holder": "r-7",
        "expires_in": 12.346,
    }


def test_slot_image_describe() -> None:
    assert V2.describe(Slot.B) == {
        "slot": "B",
        "name": "web",
        "version": "2.0.0",
        "digest": V2.digest,
    }


# -- the state file ---------------------------------------------------------------------------
def full_state() -> AgentState:
    """Every field set, none at its default."""
    return AgentState(
        slot_a=V1,
        slot_b=V3,
        booted=Slot.A,
        committed=False,
        last_good=Slot.B,
        staged=Slot.B,
        pending=PendingBoot(Slot.B, 0, SOFT, rollback=True, reason=FallbackReason.BOOT_FAILED),
        boot_count=7,
        fell_back=FellBack(Slot.B, V2.digest, FallbackReason.COMMIT_DEADLINE, 6),
        commit_deadline_at=NOW + DEADLINE,
        lease=Lease("rollout-1", NOW + 30),
        boot_id="boot-42",
    )


def test_the_state_file_round_trips_every_field() -> None:
    state = full_state()
    assert sm.from_json(json.loads(json.dumps(sm.to_json(state)))) == state


def test_lenient_fields_of_the_state_file() -> None:
    raw = sm.to_json(full_state())
    raw["boot_id"] = 7  # not a string: unknown
    raw["fell_back"]["digest"] = 5
    state = sm.from_json(raw)
    assert state.boot_id is None and state.fell_back is not None
    assert state.fell_back.digest is None


def corrupt(path: str, value: Any) -> dict[str, Any]:
    raw = sm.to_json(full_state())
    *parents, key = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[key]
    else:
        node[key] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("format", 2, "state"),
        ("slots", None, "state.slots"),
        ("slots.A", "v1", "state.slots.A"),
        ("slots.B", [], "state.slots.B"),
        ("slots.A.digest", 5, "state.slots.A.digest"),
        ("slots.B.name", KeyError, "state.slots.B.name"),
        ("slots.A.version", 1.0, "state.slots.A.version"),
        ("slots.B.good", "yes", "state.slots.B.good"),
        ("pending_boot", "B", "state.pending_boot"),
        ("pending_boot.slot", 1, "state.pending_boot.slot"),
        ("pending_boot.tries_left", True, "state.pending_boot.tries_left"),
        ("pending_boot.mode", None, "state.pending_boot.mode"),
        ("pending_boot.rollback", 0, "state.pending_boot.rollback"),
        ("fell_back", 3, "state.fell_back"),
        ("fell_back.from_slot", None, "state.fell_back.from_slot"),
        ("fell_back.reason", 1, "state.fell_back.reason"),
        ("fell_back.boot_count", "6", "state.fell_back.boot_count"),
        ("lease", ["r1"], "state.lease"),
        ("lease.holder", 1, "state.lease.holder"),
        ("lease.expires_at", "soon", "state.lease.expires_at"),
        ("commit_deadline_at", "later", "state.commit_deadline_at"),
        ("booted", 0, "state.booted"),
        ("committed", "no", "state.committed"),
        ("last_good_slot", None, "state.last_good_slot"),
        ("boot_count", 1.5, "state.boot_count"),
        ("slots.A", None, "state"),  # booted slot A holds no image
    ],
)
def test_a_corrupt_state_file_is_refused_naming_the_field(
    path: str, value: Any, field: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: (expected|booted slot)"):
        sm.from_json(corrupt(path, value))


def test_a_state_file_that_is_not_an_object() -> None:
    with pytest.raises(ValueError, match=r"^state: expected an object with format 1$"):
        sm.from_json(["format", 1])
