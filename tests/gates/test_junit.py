"""JUnit XML reports: written, then parsed back."""

from __future__ import annotations

import doctest
import xml.etree.ElementTree as ET
from pathlib import Path

import rollout.junit
from rollout.junit import JUnitCase, write_junit


def test_docstring_examples() -> None:
    result = doctest.testmod(rollout.junit)
    assert result.attempted > 0 and result.failed == 0


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "report.xml"
    write_junit(
        path,
        "rollout r1",
        [
            JUnitCase("rollout.batch", "1 (canary)", 12.5, None, "node-1 committed"),
            ("rollout.gate", "canary-tests", 3.25, "signal ci FAILURE: 2 tests failed\nsee CI", ""),
            JUnitCase("rollout.batch", "2", 0, skipped="--stop-after canary"),
        ],
    )
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "3" and root.get("failures") == "1"
    (suite,) = root.findall("testsuite")
    assert suite.attrib | {"timestamp": ""} == {
        "name": "rollout r1",
        "tests": "3",
        "failures": "1",
        "errors": "0",
        "skipped": "1",
        "time": "15.750",
        "timestamp": "",
    }
    first, second, third = suite.findall("testcase")
    assert first.attrib == {"classname": "rollout.batch", "name": "1 (canary)", "time": "12.500"}
    assert first.findtext("system-out") == "node-1 committed" and first.find("failure") is None
    failure = second.find("failure")
    assert failure is not None and failure.get("message") == "signal ci FAILURE: 2 tests failed"
    assert failure.text == "signal ci FAILURE: 2 tests failed\nsee CI"
    assert second.find("system-out") is None
    skipped = third.find("skipped")
    assert skipped is not None and skipped.get("message") == "--stop-after canary"
    assert path.read_bytes().startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.xml"]  # no temporary file left


def test_control_characters_and_markup_survive(tmp_path: Path) -> None:
    path = tmp_path / "r.xml"
    write_junit(path, "s", [("c", "<n & m>", 1.0, "\x1b[31mred\x1b[0m <b>", "out\x00put ]]>")])
    (case,) = ET.parse(path).getroot().iter("testcase")
    assert case.get("name") == "<n & m>"
    failure = case.find("failure")
    assert failure is not None and failure.text == "[31mred[0m <b>"
    assert case.findtext("system-out") == "output ]]>"


def test_empty_suite(tmp_path: Path) -> None:
    path = tmp_path / "r.xml"
    write_junit(path, "s", [])
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "0" and suite.get("time") == "0.000"
