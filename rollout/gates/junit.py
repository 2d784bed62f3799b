"""A JUnit XML report, for CI systems that gate a release on a rollout (``--junit FILE``).

One ``<testsuite>`` inside ``<testsuites>``; one ``<testcase>`` per `JUnitCase` (the CLI
makes one per batch and one per gate, e.g. classname ``rollout.batch`` name ``1 (canary)``,
or classname ``rollout.gate`` name ``canary-tests``). A case with ``failure`` gets a
``<failure message=...>``, with ``skipped`` a ``<skipped message=...>``; ``system_out``
goes to ``<system-out>``. Characters XML 1.0 cannot carry (control characters such as
terminal escapes) are dropped. Written with xml.etree.ElementTree, atomically (a temporary
file renamed over ``path``).

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
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

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
