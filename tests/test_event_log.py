"""The event log's lines (console.EventLog through configure_logging's sink) are the lines
structlog's own loggers write with the same configuration: same fields, order, level
filter and stream."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from rollout import console
from rollout.console import EventLog, configure_logging
from rollout.events import NodeChanged, StepDone
from rollout.model import NodePhase, Reason, Step


def lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line]


def drain() -> None:
    assert console._sink is not None
    console._sink.out.drain()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_sink_writes_what_structlog_writes(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(fmt)
    log = EventLog("r1")
    log(StepDone("n1", Step.STAGE, 0.12345, True))
    log(NodeChanged("n1", 2, NodePhase.FAILED, Reason.UNHEALTHY, "checks kept failing"))
    structlog.get_logger("rollout").info(
        "node_step", rollout="r1", node="n1", batch=None, step="stage", seconds=0.123,
        outcome="ok",
    )  # fmt: skip
    structlog.get_logger("rollout").warning(
        "node_failed", rollout="r1", node="n1", batch=2, reason="unhealthy",
        detail="checks kept failing",
    )  # fmt: skip
    drain()
    got = lines(capsys.readouterr().err)
    assert len(got) == 4, got
    if fmt == "json":
        ours, theirs = [json.loads(x) for x in got[:2]], [json.loads(x) for x in got[2:]]
        for a, b in zip(ours, theirs, strict=True):
            assert list(a) == list(b)  # the keys in the same order, the timestamp's too
            a.pop("timestamp"), b.pop("timestamp")
            assert list(a.items()) == list(b.items())
        assert ours[1]["level"] == "warning" and ours[1]["reason"] == "unhealthy"
    else:
        strip = [line.split(" ", 1)[1] for line in got]  # the timestamp
        assert strip[:2] == strip[2:]
        assert "[warning  ] node_failed" in strip[1]


def test_the_level_filter_applies(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", level=logging.WARNING)
    log = EventLog("r1")
    log(StepDone("n1", Step.BOOT, 1.0, True))  # info: filtered out
    log(StepDone("n2", Step.BOOT, 1.0, False))  # warning: written
    drain()
    got = [json.loads(x) for x in lines(capsys.readouterr().err)]
    assert [(g["node"], g["level"], g["outcome"]) for g in got] == [("n2", "warning", "error")]
    configure_logging("json")  # as the other tests expect


def test_without_configure_logging_the_log_goes_through_structlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(console, "_sink", None)
    with structlog.testing.capture_logs() as captured:
        EventLog("r1")(StepDone("n1", Step.COMMIT, 0.5, True))
    assert captured == [
        {"rollout": "r1", "node": "n1", "batch": None, "step": "commit", "seconds": 0.5,
         "outcome": "ok", "event": "node_step", "log_level": "info"},
    ]  # fmt: skip
