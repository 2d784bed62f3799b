"""Wait-condition signals (Heat native and CloudFormation bodies) and the boxes."""

from __future__ import annotations

import asyncio
import doctest

import pytest

import rollout.gates.signals
from rollout import clock
from rollout.gates.signals import (
    ApprovalBox,
    GateBoxes,
    Signal,
    SignalBox,
    Status,
    parse_signal,
)

pytestmark = pytest.mark.looptime


def test_docstring_examples() -> None:
    result = doctest.testmod(rollout.gates.signals)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("body", "signal"),
    [
        # Heat native
        ({"status": "SUCCESS", "reason": "ok", "data": "build 42", "id": "ci-1"},
         Signal(Status.SUCCESS, "ok", "build 42", "ci-1")),
        ({"status": "FAILURE", "reason": "smoke failed"}, Signal(Status.FAILURE, "smoke failed")),
        ({}, Signal(Status.SUCCESS)),  # Heat: a bare signal is a SUCCESS
        (None, Signal(Status.SUCCESS)),
        ({"status": "success", "id": 7}, Signal(Status.SUCCESS, id="7")),
        ({"data": {"tests": 12}}, Signal(Status.SUCCESS, data='{"tests": 12}')),
        # CloudFormation
        ({"Status": "SUCCESS", "Reason": "done", "UniqueId": "i-1", "Data": "x"},
         Signal(Status.SUCCESS, "done", "x", "i-1")),
        ({"Status": "FAILURE", "UniqueId": "i-2"}, Signal(Status.FAILURE, id="i-2")),
    ],
)  # fmt: skip
def test_parse_both_styles(body: object, signal: Signal) -> None:
    assert parse_signal(body) == signal


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "body: expected a JSON object, got an array"),
        ("SUCCESS", "body: expected a JSON object, got a string"),
        ({"status": "OK"}, 'status: expected "SUCCESS" or "FAILURE", got "OK"'),
        ({"status": 1}, 'status: expected "SUCCESS" or "FAILURE", got a number'),
        ({"Status": "DONE", "UniqueId": "a"},
         'Status: expected "SUCCESS" or "FAILURE", got "DONE"'),
        ({"Status": "SUCCESS"}, "UniqueId: required in a CloudFormation signal"),
        ({"UniqueId": "a"}, "Status: required in a CloudFormation signal"),
        ({"Status": "SUCCESS", "UniqueId": None}, "UniqueId: must not be null"),
        ({"status": "SUCCESS", "stauts": "x"}, "stauts: unknown field for a Heat native signal"),
        ({"Status": "SUCCESS", "UniqueId": "a", "id": "b"},
         "id: unknown field for a CloudFormation signal (known: Status, Reason, UniqueId, Data) "
         "(do not mix Heat native and CloudFormation keys)"),
        ({"reason": 5}, "reason: expected a string, got a number"),
        ({"id": ""}, "id: must not be empty"),
        ({"id": True}, "id: expected a string, got a boolean"),
        ({"id": "x" * 300}, "id: longer than 255 characters"),
        ({"data": "x" * 70000}, "data: longer than 65536 characters"),
    ],
)  # fmt: skip
def test_bad_bodies_name_the_field(body: object, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_signal(body)
    assert str(err.value) == message or str(err.value).startswith(message)


async def test_count_distinct_ids_repeats_count_once() -> None:
    box = SignalBox("tests")
    for sid in ("a", "a", "b", "a"):
        box.add(Signal(Status.SUCCESS, id=sid))
    task = asyncio.create_task(box.wait(3, 100))
    await asyncio.sleep(10)
    assert not task.done() and box.waiting
    box.add(Signal(Status.SUCCESS, id="c"))
    result = await task
    assert result.status == "success" and result.success_ids == ("a", "b", "c")
    assert clock.now() == pytest.approx(10) and not box.waiting


async def test_signals_without_id_are_numbered_and_distinct() -> None:
    box = SignalBox("tests")
    first, second = box.add(Signal(Status.SUCCESS)), box.add(Signal(Status.SUCCESS))
    assert (first.id, second.id) == ("1", "2")
    result = await box.wait(2, 5)
    assert result.status == "success" and clock.now() == 0


async def test_failure_fails_at_once_whatever_the_count() -> None:
    box = SignalBox("tests")
    box.add(Signal(Status.SUCCESS, id="a"))
    asyncio.get_running_loop().call_at(3, box.add, Signal(Status.FAILURE, "boom", id="a"))
    result = await box.wait(5, 100)
    assert result.status == "failure" and result.message == "signal a FAILURE: boom"
    assert clock.now() == pytest.approx(3)


async def test_timeout_on_the_loop_clock() -> None:
    box = SignalBox("tests")
    asyncio.get_running_loop().call_at(30, box.add, Signal(Status.SUCCESS, id="a"))
    seen: list[Signal] = []
    result = await box.wait(2, 120, seen.append)
    assert result.status == "timeout" and clock.now() == pytest.approx(120)
    assert [s.id for s in seen] == ["a"] and "1 of 2" in result.message


async def test_a_wait_consumes_what_it_saw() -> None:
    box = SignalBox("tests")
    box.add(Signal(Status.FAILURE, id="old"))
    assert (await box.wait(1, 1)).status == "failure"
    box.add(Signal(Status.SUCCESS, id="new"))
    assert (await box.wait(1, 1)).status == "success"
    assert [s.id for s in box.history] == ["old", "new"]


async def test_approvals() -> None:
    box = ApprovalBox("go")
    asyncio.get_running_loop().call_at(60, box.approve, "alice", "looks good")
    decision = await box.wait(None)
    assert decision is not None and (decision.approved, decision.by) == (True, "alice")
    assert clock.now() == pytest.approx(60)
    box.reject("bob", "no")
    box.approve("carol")  # after the first decision, the same wait takes no other
    decision = await box.wait(10)
    assert decision is not None and (decision.approved, decision.reason) == (False, "no")
    assert await box.wait(10) is None and clock.now() == pytest.approx(70)
    assert [d.by for d in box.history] == ["alice", "bob", "carol"]


def test_boxes_are_made_once_per_gate() -> None:
    boxes = GateBoxes()
    assert boxes.signals("a") is boxes.signals("a") and boxes.signals("a") is not boxes.signals("b")
    assert boxes.approvals("a") is boxes.approvals("a")
