"""The JUnit report of a rollout (`rollout run --junit FILE`), for CI systems.

An observer collects what a report needs while the rollout runs (time spent per node,
each gate's outcome); `write` then makes one test case per node (classname
`rollout.batch<N>`, failed when the node failed, skipped when the rollout never reached
it) and one per gate run (classname `rollout.gate`, failed unless it passed).

The writer underneath, `write_junit`: one ``<testsuite>`` inside ``<testsuites>``; one
``<testcase>`` per `JUnitCase` (one per node and one per gate run, e.g. classname
``rollout.batch1`` name ``node-01``, or classname ``rollout.gate`` name
``canary-tests``). A case with ``failure`` gets a ``<failure message=...>``, with
``skipped`` a ``<skipped message=...>``; ``system_out`` goes to ``<system-out>``.
Characters XML 1.0 cannot carry (control characters such as terminal escapes) are
dropped. Written with xml.etree.ElementTree, atomically (a temporary file renamed over
``path``).

>>> import tempfile, os, xml.etree.ElementTree as ET
>>> path = os.path.join(tempfile.mkdtemp(), "r.xml")
>>> write_junit(path, "rollout", [JUnitCase("rollout.batch", "1 (canary)", 12.5, None, "ok")])
>>> ET.parse(path).getroot().find("testsuite").get("tests")
'1'
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from rollout.events import Event, StepDone
from rollout.gates.events import GateFinished, GateWaiting
from rollout.model import NodePhase
from rollout.record import RolloutResult

__all__ = ["JUnitCase", "write_junit"]

_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class JUnitCase(NamedTuple):
    """(classname, name, seconds, failure message or None, system-out[, skipped])."""

    classname: str
    name: str
    seconds: float
    failure: str | None = None
    system_out: str = ""
    skipped: str | None = None


def _clean(text: str) -> str:
    return _ILLEGAL.sub("", text)


def build_junit(
    suite_name: str, cases: Iterable[JUnitCase | tuple[object, ...]]
) -> ET.ElementTree[ET.Element]:
    """The report as an ElementTree (`write_junit` writes it)."""
    items = [c if isinstance(c, JUnitCase) else JUnitCase(*c) for c in cases]  # type: ignore[arg-type]
    failures = sum(1 for c in items if c.failure is not None)
    skipped = sum(1 for c in items if c.failure is None and c.skipped is not None)
    total = sum(max(0.0, c.seconds) for c in items)
    root = ET.Element("testsuites", name=_clean(suite_name))
    suite = ET.SubElement(
        root,
        "testsuite",
        name=_clean(suite_name),
        tests=str(len(items)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{total:.3f}",
        timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
    )
    root.set("tests", str(len(items)))
    root.set("failures", str(failures))
    root.set("time", f"{total:.3f}")
    for c in items:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=_clean(c.classname),
            name=_clean(c.name),
            time=f"{max(0.0, c.seconds):.3f}",
        )
        if c.failure is not None:
            first = _clean(c.failure).splitlines()[0] if c.failure.strip() else "failed"
            node = ET.SubElement(case, "failure", message=first, type="failure")
            node.text = _clean(c.failure)
        elif c.skipped is not None:
            ET.SubElement(case, "skipped", message=_clean(c.skipped))
        if c.system_out:
            ET.SubElement(case, "system-out").text = _clean(c.system_out)
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(
    path: str | os.PathLike[str],
    suite_name: str,
    cases: Iterable[JUnitCase | tuple[object, ...]],
) -> None:
    """Write the report to ``path`` (UTF-8, with an XML declaration), atomically."""
    tree = build_junit(suite_name, cases)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "wb") as out:
            tree.write(out, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class JUnitReport:
    def __init__(self, rollout_id: str) -> None:
        self.rollout_id = rollout_id
        self.node_seconds: dict[str, float] = defaultdict(float)
        self.gate_since: dict[str, float] = {}
        self.gate_cases: list[JUnitCase] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, StepDone):
            self.node_seconds[event.node_id] += event.seconds
        elif isinstance(event, GateWaiting):
            self.gate_since.setdefault(event.gate, event.since.timestamp())
        elif isinstance(event, GateFinished):
            since = self.gate_since.pop(event.gate, None)
            runs = sum(c.name.split(" #")[0] == event.gate for c in self.gate_cases)
            name = event.gate if not runs else f"{event.gate} #{runs + 1}"
            seconds = 0.0 if since is None else max(0.0, time.time() - since)
            failure = None if event.result == "passed" else f"{event.result}: {event.message}"
            self.gate_cases.append(
                JUnitCase("rollout.gate", name, seconds, failure, f"{event.kind}: {event.message}")
            )

    def cases(self, result: RolloutResult) -> list[JUnitCase]:
        out = []
        for rec in result.nodes.values():
            failure = None
            if rec.failed or rec.phase is NodePhase.ROLLBACK_FAILED:
                failure = f"{rec.reason or 'failed'}: {rec.detail}"
            skipped = "not reached" if rec.phase is NodePhase.PENDING and not failure else None
            out.append(
                JUnitCase(
                    f"rollout.batch{rec.batch}",
                    rec.node.id,
                    self.node_seconds.get(rec.node.id, 0.0),
                    failure,
                    f"phase {rec.phase}, version {rec.version}",
                    skipped,
                )
            )
        return out + self.gate_cases

    def write(self, path: str, result: RolloutResult) -> None:
        write_junit(path, f"rollout {self.rollout_id}: {result.phase}", self.cases(result))
