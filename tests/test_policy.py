"""Policy schema and loading: values, defaults, shipped files, and every error message."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
from pydantic import ValidationError

import rollout.policy
from rollout.errors import InputError
from rollout.model import ActivationMode
from rollout.policy import (
    AgentCheck,
    HttpCheck,
    Policy,
    TcpCheck,
    load_policy,
    parse_policy,
)
from rollout.units import Amount, parse_duration

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def test_docstring_examples() -> None:
    result = doctest.testmod(rollout.policy)
    assert result.attempted > 0 and result.failed == 0


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (3, 3.0),
        (1.5, 1.5),
        (0, 0.0),
        ("10", 10.0),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        (" 5s ", 5.0),
    ],
)
def test_parse_duration(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("fast", 'expected a duration like "500ms", "5s", "2m" or "1h30m", got "fast"'),
        ("5 s", 'got "5 s"'),
        ("5d", 'got "5d"'),
        ("", 'got ""'),
        (True, "got true"),
        (None, "got null"),
        ([1], "got a list"),
        (-1, "must not be negative, got -1"),
        ("-2s", 'must not be negative, got "-2s"'),
        (float("inf"), "got inf"),
    ],
)
def test_parse_duration_rejects(raw: object, problem: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_duration(raw)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    ("raw", "value", "percent", "dumped"),
    [
        (3, 3, False, 3),
        ("3", 3, False, 3),
        (0, 0, False, 0),
        (4.0, 4, False, 4),
        ("25%", 25, True, "25%"),
        ("12.5%", 12.5, True, "12.5%"),
        ("100%", 100, True, "100%"),
        (" 5 % ", 5, True, "5%"),
    ],
)
def test_amount_parse(raw: object, value: float, percent: bool, dumped: object) -> None:
    a = Amount.parse(raw)
    assert (a.value, a.percent, a.to_yaml()) == (value, percent, dumped)


@pytest.mark.parametrize(
    ("amount", "total", "up", "down"),
    [
        ("25%", 10, 3, 2),
        ("25%", 8, 2, 2),
        ("10%", 30, 3, 3),  # exact arithmetic: 0.1 * 30 is not 3.0000000000000004
        ("10%", 9, 1, 0),
        ("12.5%", 8, 1, 1),
        ("1%", 1, 1, 0),
        ("100%", 7, 7, 7),
        ("33.3%", 3, 1, 0),
        (3, 10, 3, 3),
        (20, 5, 20, 20),  # counts are returned as they are
        (0, 5, 0, 0),
    ],
)
def test_amount_resolve(amount: object, total: int, up: int, down: int) -> None:
    a = Amount.parse(amount)
    assert a.resolve(total, round_up=True) == up
    assert a.resolve(total, round_up=False) == down


# -- defaults, shipped files, round trip ---------------------------------------------------


def test_defaults() -> None:
    p = parse_policy({}, "empty")
    assert p.activation is ActivationMode.REBOOT
    assert p.batches.canary == Amount(1)
    assert p.batches.size == Amount(25, True)
    assert p.batches.max_unavailable == Amount(25, True)
    assert p.batches.spread_by is None
    assert p.health.checks == (AgentCheck(),)
    assert (p.health.interval, p.health.min_healthy_time, p.health.deadline) == (1, 10, 300)
    assert (p.health.boot_timeout, p.health.failure_threshold) == (120, 0)
    assert (p.failure.max_failed, p.failure.action) == (Amount(0), "rollback")
    assert p == Policy()


@pytest.mark.parametrize("name", ["canary.yaml", "cautious.yaml", "fast.yaml"])
def test_shipped_policies_load(name: str) -> None:
    p = load_policy(POLICIES / name)
    assert p.batches.canary == Amount(1)
    assert parse_policy(p.model_dump(mode="json"), name) == p


def test_shipped_canary_values() -> None:
    p = load_policy(POLICIES / "canary.yaml")
    assert p.activation is ActivationMode.REBOOT
    assert (p.batches.size, p.batches.max_unavailable) == (Amount(25, True), Amount(25, True))
    assert p.health.checks == (HttpCheck(port=8080, path="/healthz"), AgentCheck())
    h = p.health
    assert (h.interval, h.min_healthy_time, h.deadline, h.boot_timeout) == (0.5, 3, 60, 60)
    assert h.failure_threshold == 6
    assert (p.failure.max_failed, p.failure.action) == (Amount(0), "rollback")


def test_shipped_cautious_and_fast_values() -> None:
    c = load_policy(POLICIES / "cautious.yaml")
    assert (c.batches.size, c.batches.spread_by, c.failure.action) == (
        Amount(10, True),
        "rack",
        "rollback-all",
    )
    assert c.health.min_healthy_time > 3
    f = load_policy(POLICIES / "fast.yaml")
    assert f.activation is ActivationMode.KEXEC
    assert (f.batches.size, f.batches.max_unavailable) == (Amount(50, True), Amount(50, True))
    assert (f.failure.max_failed, f.failure.action) == (Amount(10, True), "continue")


def test_checks_are_discriminated() -> None:
    p = parse_policy(
        {
            "health": {
                "checks": [
                    {"type": "http", "port": 9000, "path": "/ready", "timeout": "250ms"},
                    {"type": "tcp", "port": 22},
                    {"type": "agent"},
                ]
            }
        },
        "x",
    )
    http, tcp, agent = p.health.checks
    assert isinstance(http, HttpCheck) and (http.port, http.path, http.timeout) == (
        9000,
        "/ready",
        0.25,
    )
    assert isinstance(tcp, TcpCheck) and (tcp.port, tcp.timeout) == (22, 2.0)
    assert isinstance(agent, AgentCheck)


def test_dump_keeps_user_forms() -> None:
    p = parse_policy({"batches": {"canary": 0, "size": "12.5%"}, "health": {"deadline": "2m"}}, "x")
    dumped = p.model_dump(mode="json")
    assert dumped["batches"] == {
        "canary": 0,
        "size": "12.5%",
        "max_unavailable": "25%",
        "spread_by": None,
    }
    assert dumped["health"]["deadline"] == 120.0
    assert dumped["activation"] == "reboot"


def test_models_are_frozen() -> None:
    p = Policy()
    with pytest.raises(ValidationError):
        p.batches.canary = Amount(2)
    hash(p)


# -- errors: one line, file, field path, problem -------------------------------------------

ERRORS = [
    # amounts
    (
        "batches: {size: lots}",
        'batches.size: expected a count or a percentage like "25%", got "lots"',
    ),
    (
        "batches: {size: 0}",
        "batches.size: must be greater than 0 (a batch needs at least one node)",
    ),
    ("batches: {max_unavailable: 0}", "batches.max_unavailable: must be greater than 0"),
    (
        'batches: {size: "150%"}',
        'batches.size: a percentage must be more than 0% and at most 100%, got "150%"',
    ),
    ('batches: {canary: "0%"}', "batches.canary: a percentage must be more than 0%"),
    ("batches: {canary: -1}", "batches.canary: must not be negative, got -1"),
    ("batches: {canary: 1.5}", "batches.canary: a count must be a whole number, got 1.5"),
    (
        "batches: {canary: yes}",
        'batches.canary: expected a count or a percentage like "25%", got true',
    ),
    (
        'failure: {max_failed: "x%"}',
        'failure.max_failed: expected a count or a percentage like "25%", got "x%"',
    ),
    ('batches: {spread_by: ""}', "batches.spread_by: must not be empty"),
    # unknown fields
    (
        "batches: {sise: 3}",
        "batches.sise: unknown field (known: canary, size, max_unavailable, spread_by)",
    ),
    (
        "batch: {}",
        "batch: unknown field (known: activation, batches, health, failure, gates, notify, "
        "prestage)",
    ),
    (
        "health: {checks: [{type: http, prot: 80}]}",
        "health.checks[0].prot: unknown field (known: type, port, path, expect_status, timeout)",
    ),
    (
        "health: {checks: [{type: agent, port: 1}]}",
        "health.checks[0].port: unknown field (known: type)",
    ),
    # durations
    (
        "health: {interval: fast}",
        'health.interval: expected a duration like "500ms", "5s", "2m" or "1h30m", got "fast"',
    ),
    ("health: {interval: 0}", "health.interval: must be greater than 0, got 0"),
    ("health: {boot_timeout: -5s}", 'health.boot_timeout: must not be negative, got "-5s"'),
    (
        "health: {checks: [{type: tcp, port: 1, timeout: 0}]}",
        "health.checks[0].timeout: must be greater than 0, got 0",
    ),
    # deadline vs min_healthy_time
    (
        "health: {min_healthy_time: 10s, deadline: 10s}",
        "health.deadline: must be greater than min_healthy_time (10s), got 10s",
    ),
    (
        "health: {deadline: 5s}",
        "health.deadline: must be greater than min_healthy_time (10s), got 5s",
    ),
    # checks
    ("health: {checks: []}", "health.checks: must not be empty"),
    ("health: {checks: agent}", 'health.checks: expected a list, got "agent"'),
    ("health: {checks: [agent]}", 'health.checks[0]: expected a mapping, got "agent"'),
    (
        "health: {checks: [{type: ping}]}",
        'health.checks[0]: unknown check type "ping" (allowed: http, tcp, agent)',
    ),
    (
        "health: {checks: [{port: 80}]}",
        'health.checks[0]: missing "type" (allowed: http, tcp, agent)',
    ),
    (
        "health: {checks: [{type: agent}, {type: http, port: 70000}]}",
        "health.checks[1].port: must be at most 65535, got 70000",
    ),
    (
        "health: {checks: [{type: tcp, port: 0}]}",
        "health.checks[0].port: must be at least 1, got 0",
    ),
    ("health: {checks: [{type: tcp}]}", "health.checks[0].port: required field missing"),
    (
        "health: {checks: [{type: http, port: web}]}",
        'health.checks[0].port: expected a whole number, got "web"',
    ),
    (
        "health: {checks: [{type: http, path: healthz}]}",
        'health.checks[0].path: must start with "/", got "healthz"',
    ),
    (
        "health: {checks: [{type: http, expect_status: 42}]}",
        "health.checks[0].expect_status: must be at least 100, got 42",
    ),
    # other fields
    ("health: {failure_threshold: -1}", "health.failure_threshold: must be at least 0, got -1"),
    (
        "health: {failure_threshold: 2.5}",
        "health.failure_threshold: expected a whole number, got 2.5",
    ),
    (
        "failure: {action: explode}",
        'failure.action: expected one of: halt, rollback, rollback-all, continue; got "explode"',
    ),
    ("activation: magic", 'activation: expected one of: reboot, kexec, soft-reboot; got "magic"'),
    ("health: [1]", "health: expected a mapping, got a list"),
    ("health:", "health: expected a mapping, got null"),
    ("1: 2", "1: keys must be strings, got 1"),
]


@pytest.mark.parametrize(
    ("text", "expected"), ERRORS, ids=[e[1].split(":")[0] + f"-{i}" for i, e in enumerate(ERRORS)]
)
def test_policy_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError) as err:
        load_policy(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message
    field = expected.split(":")[0]
    assert message.startswith(f"{path}: {field}: ")


def test_first_error_of_many_is_reported(tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        parse_policy({"batches": {"size": "lots", "canary": -1}, "activation": "x"}, "p.yaml")
    assert str(err.value).count("p.yaml") == 1
    assert "\n" not in str(err.value)


def test_exact_message_from_brief() -> None:
    with pytest.raises(InputError) as err:
        parse_policy({"batches": {"size": "lots"}}, "policies/x.yaml")
    assert str(err.value) == (
        'policies/x.yaml: batches.size: expected a count or a percentage like "25%", got "lots"'
    )
    with pytest.raises(InputError) as err:
        parse_policy({"batches": {"sise": 1}}, "policies/x.yaml")
    assert str(err.value) == (
        "policies/x.yaml: batches.sise: unknown field "
        "(known: canary, size, max_unavailable, spread_by)"
    )


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("batches:\n  size: 3\n  canary: [1\nhealth: {}\n")
    with pytest.raises(InputError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line ")
    assert "column" in message and "invalid YAML" in message
    assert message.endswith("(it began at line 3, column 11)")
    assert "\n" not in message


def test_yaml_bad_indentation_points_at_line(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("batches:\n  size: 3\n canary: 1\n")
    with pytest.raises(InputError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}: line 3, column 2: invalid YAML: ")


def test_duplicate_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("batches:\n  size: 3\n  size: 4\n")
    with pytest.raises(InputError) as err:
        load_policy(path)
    assert str(err.value) == f'{path}: line 3, column 3: invalid YAML: duplicate key "size"'


def test_missing_file_suggests_shipped_policies(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as err:
        load_policy(path)
    message = str(err.value)
    assert message.startswith(f"{path}: no such policy file; ")
    assert "canary.yaml" in message and "cautious.yaml" in message and "fast.yaml" in message
    assert "\n" not in message


def test_directory_is_not_a_policy(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a directory"):
        load_policy(tmp_path)


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}: the policy is empty; expected a mapping")


@pytest.mark.parametrize(
    ("text", "got"),
    [("- canary: 1\n", "got a list"), ("canary\n", 'got "canary"'), ("3\n", "got 3")],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_policy(path)
    assert str(err.value) == (
        f"{path}: expected a mapping at the top level "
        f"(with any of: activation, batches, health, failure, gates, notify, prestage), {got}"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not a UTF-8 text file"):
        load_policy(path)
