"""One source for the file formats: the models' Field descriptions, the docs' field tables,
the shipped JSON Schemas, and what the schema accepts versus what the loader accepts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rollout import schema, units
from rollout.errors import InputError
from rollout.inventory import parse_inventory
from rollout.policy import HttpCheck, parse_policy
from rollout.schema import KINDS, Kind, field_tables, json_schema

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python -m rollout.schema --write"


def validator(kind: Kind) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json_schema(kind))


def parser_accepts(kind: Kind, data: object) -> str | None:
    """None when the loader accepts ``data``, else its one-line message."""
    try:
        if kind == "policy":
            parse_policy(data, "test.yaml")
        else:
            parse_inventory(data, "test.yaml")
    except InputError as exc:
        return str(exc)
    return None


def schema_errors(kind: Kind, data: object) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator(kind).iter_errors(data)]


# -- (a) the docs' generated tables ---------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_doc_tables_are_generated_from_the_descriptions(kind: Kind) -> None:
    doc = schema.DOCS[kind]
    text = doc.read_text(encoding="utf-8")
    tables = field_tables(kind)
    current = schema.generated_sections(text)
    assert sorted(current) == sorted(tables), (
        f"{doc.relative_to(ROOT)}: the generated sections {sorted(current)} do not match the "
        f"tables {sorted(tables)}; add a <!-- generated: KEY --> ... <!-- end generated --> "
        f"block for each, then run: {REGENERATE}"
    )
    stale = [key for key in tables if current[key] != tables[key]]
    assert not stale, (
        f"{doc.relative_to(ROOT)}: the field tables {', '.join(stale)} differ from the Field "
        f"descriptions in rollout/{kind}.py; regenerate them with: {REGENERATE}"
    )
    assert schema.render_doc(text, tables) == text


def test_a_changed_description_makes_the_docs_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    text = schema.DOCS["policy"].read_text(encoding="utf-8")
    field = HttpCheck.model_fields["expect_status"]
    monkeypatch.setattr(field, "description", "Some other words.")
    tables = field_tables("policy")
    assert "Some other words." in tables["policy.health.checks.http"]
    assert (
        schema.generated_sections(text)["policy.health.checks.http"]
        != (tables["policy.health.checks.http"])
    )
    assert schema.render_doc(text, tables) != text


def test_render_doc_refuses_unknown_and_missing_sections() -> None:
    tables = {"policy.batches": "| t |\n"}
    with pytest.raises(ValueError, match="no such table"):
        schema.render_doc("<!-- generated: policy.nope -->\n<!-- end generated -->", tables)
    with pytest.raises(ValueError, match=r"missing policy\.batches"):
        schema.render_doc("no markers", tables)
    prose = "before\n<!-- generated: policy.batches -->\nold\n<!-- end generated -->\nafter\n"
    assert schema.render_doc(prose, tables) == (
        "before\n<!-- generated: policy.batches -->\n| t |\n<!-- end generated -->\nafter\n"
    )


def test_every_field_has_a_description_and_a_row() -> None:
    tables = "".join(field_tables("policy").values())
    for name in ("canary", "min_healthy_time", "failure_limit", "on_inconclusive", "bandwidth"):
        assert f"| `{name}` |" in tables
    rows = [line for line in tables.splitlines() if line.startswith("| `")]
    assert all(line.count(" | ") >= 3 and not line.endswith("|  |") for line in rows)


def test_tables_name_the_file_forms() -> None:
    tables = field_tables("policy")
    assert "| `interval` | Duration, > 0 | `1s` |" in tables["policy.health"]
    assert '| `size` | Amount, > 0 | `"25%"` |' in tables["policy.batches"]
    assert "| `port` | integer, 1-65535 | `8080` |" in tables["policy.health.checks.http"]
    assert "| `timeout` | Duration, > 0 | `1h` |" in tables["policy.gates.wait"]
    assert "required; only for `bake`, `wait`, `approval`, `analysis`" in tables["policy.gates"]
    assert "| `events` |" in tables["policy.notify"] and "| all |" in tables["policy.notify"]
    inventory_tables = field_tables("inventory")
    assert (
        "| `token_file` | path or null | top-level `token_file` |"
        in (inventory_tables["inventory.nodes"])
    )


# -- (b) the shipped schemas ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_schema_is_current(kind: Kind) -> None:
    path = schema.schema_path(kind)
    assert path.exists(), f"{path.relative_to(ROOT)} is missing; write it with: {REGENERATE}"
    shipped = json.loads(path.read_text(encoding="utf-8"))
    assert shipped == json_schema(kind), (
        f"{path.relative_to(ROOT)} differs from the models; regenerate it with: {REGENERATE}"
    )
    assert path.read_text(encoding="utf-8") == schema.schema_text(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_a_valid_2020_12_schema(kind: Kind) -> None:
    js = json_schema(kind)
    jsonschema.Draft202012Validator.check_schema(js)
    assert js["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert js["$id"] == f"urn:rollout:schema:{kind}"
    assert js["title"] and js["additionalProperties"] is False
    objects = [d for d in js["$defs"].values() if d.get("type") == "object"]
    assert objects and all(d.get("additionalProperties") is False for d in objects), (
        "every model forbids extra fields, so every object of the schema must too"
    )


def test_schema_patterns_are_ecma_and_python_compatible() -> None:
    """Editors run patterns as ECMA-262 regexes: no Python-only syntax."""
    for kind in KINDS:
        text = schema.schema_text(kind)
        for pattern in re.findall(r'"pattern": "((?:[^"\\]|\\.)*)"', text):
            regex = json.loads(f'"{pattern}"')
            assert "(?P" not in regex and "\\Z" not in regex and "(?i" not in regex, regex
            assert regex.startswith("^"), f"unanchored: {regex}"  # JSON Schema searches
            re.compile(regex)


def test_file_forms_carry_editor_messages() -> None:
    """A number-or-string form has one message for both branches, in the loader's words."""
    health = json_schema("policy")["$defs"]["Health"]["properties"]
    messages = {branch["errorMessage"] for branch in health["interval"]["anyOf"]}
    assert messages == {schema._POSITIVE_DURATION_MESSAGE}
    messages = {branch["errorMessage"] for branch in health["min_healthy_time"]["anyOf"]}
    assert messages == {schema._DURATION_MESSAGE}
    node = json_schema("inventory")["$defs"]["NodeEntry"]["properties"]
    assert "host:port" in node["address"]["patternErrorMessage"]


def test_unknown_before_validator_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new BeforeValidator without a file form must not yield a silently wrong schema."""
    monkeypatch.delitem(schema._BEFORE, units.parse_rate)
    with pytest.raises(TypeError, match="no file form for the BeforeValidator"):
        json_schema("policy")


# -- (c) the schema accepts what the loader accepts -----------------------------------------


def yaml_examples(doc: Path, fields: set[str]) -> list[Any]:
    """Each ```yaml block of a doc that is a whole (or partial) file of that kind."""
    blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL)
    examples = [yaml.safe_load(b) for b in blocks]
    return [e for e in examples if isinstance(e, dict) and set(e) <= fields]


def test_docs_have_examples() -> None:
    assert (
        len(yaml_examples(schema.DOCS["policy"], set(schema._MODELS["policy"].model_fields))) >= 4
    )
    assert yaml_examples(schema.DOCS["inventory"], set(schema._MODELS["inventory"].model_fields))


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_validate(path: Path) -> None:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert parser_accepts("policy", data) is None
    assert schema_errors("policy", data) == []


@pytest.mark.parametrize("kind", KINDS)
def test_doc_examples_validate(kind: Kind) -> None:
    fields = set(schema._MODELS[kind].model_fields)
    for example in yaml_examples(schema.DOCS[kind], fields):
        assert parser_accepts(kind, example) is None, example
        assert schema_errors(kind, example) == [], example


def gate(**fields: object) -> dict[str, Any]:
    return {"gates": [{"name": "g", "kind": "bake", "after": "every", "duration": "5m", **fields}]}


def window(**fields: object) -> dict[str, Any]:
    return {"gates": [{"name": "w", "kind": "window", "start": "22:00", "end": "06:00", **fields}]}


def check(**fields: object) -> dict[str, Any]:
    return {"health": {"checks": [fields]}}


# (case, policy, valid): the schema and parse_policy must both accept or both refuse.
POLICY_CASES = [
    ("empty policy", {}, True),
    ("typo'd field", {"batches": {"sise": 2}}, False),
    ("typo'd section", {"helth": {}}, False),
    ("typo in a check", check(type="http", prot=8080), False),
    ("duration in seconds", {"health": {"interval": 2}}, True),
    ("duration 1.5 seconds", {"health": {"interval": 1.5}}, True),
    ("duration string", {"health": {"deadline": "1h30m"}}, True),
    ("duration in ms", {"health": {"interval": "500ms"}}, True),
    ("duration numeric string", {"health": {"interval": "10"}}, True),
    ("duration with spaces around", {"health": {"interval": " 5s "}}, True),
    ("bad duration string", {"health": {"interval": "5 seconds"}}, False),
    ("duration unit days", {"health": {"interval": "1d"}}, False),
    ("negative duration", {"health": {"min_healthy_time": "-5s"}}, False),
    ("zero interval", {"health": {"interval": 0}}, False),
    ("zero interval string", {"health": {"interval": "0s"}}, False),
    ("zero min_healthy_time", {"health": {"min_healthy_time": "0s"}}, True),
    ("duration true", {"health": {"interval": True}}, False),
    ("percentage", {"batches": {"size": "25%"}}, True),
    ("percentage with decimals", {"batches": {"size": "12.5%"}}, True),
    ("100%", {"batches": {"max_unavailable": "100%"}}, True),
    ("0%", {"batches": {"size": "0%"}}, False),
    ("over 100%", {"batches": {"size": "101%"}}, False),
    ("count", {"batches": {"size": 3}}, True),
    ("count as string", {"batches": {"canary": "2"}}, True),
    ("fractional count", {"batches": {"size": 2.5}}, False),
    ("negative count", {"batches": {"canary": -1}}, False),
    ("zero size", {"batches": {"size": 0}}, False),
    ("zero canary", {"batches": {"canary": 0}}, True),
    ("words for an amount", {"batches": {"size": "lots"}}, False),
    ("spread_by empty", {"batches": {"spread_by": ""}}, False),
    ("activation", {"activation": "soft-reboot"}, True),
    ("unknown activation", {"activation": "warp"}, False),
    ("no checks", {"health": {"checks": []}}, False),
    ("unknown check type", check(type="ping"), False),
    ("check without type", check(port=80), False),
    ("tcp check", check(type="tcp", port=6379), True),
    ("tcp check without port", check(type="tcp"), False),
    ("port too big", check(type="tcp", port=70000), False),
    ("port as string", check(type="tcp", port="80"), False),
    ("relative http path", check(type="http", path="healthz"), False),
    ("status out of range", check(type="http", expect_status=600), False),
    ("failure action", {"failure": {"action": "rollback-all", "max_failed": "10%"}}, True),
    ("unknown failure action", {"failure": {"action": "panic"}}, False),
    ("shorthand prestage", {"prestage": "next-batch"}, True),
    ("unknown prestage shorthand", {"prestage": "fast"}, False),
    ("prestage mapping", {"prestage": {"mode": "all", "max_concurrent": 4}}, True),
    ("bandwidth rate", {"prestage": {"bandwidth": "50MiB/s"}}, True),
    ("bandwidth rate with space", {"prestage": {"bandwidth": "10 MB/s"}}, True),
    ("bandwidth bytes per second", {"prestage": {"bandwidth": 4096}}, True),
    ("bandwidth bad unit", {"prestage": {"bandwidth": "50Mbit/s"}}, False),
    ("bandwidth zero", {"prestage": {"bandwidth": "0MiB/s"}}, False),
    ("bandwidth number string", {"prestage": {"bandwidth": "4096"}}, False),
    ("max_concurrent zero", {"prestage": {"max_concurrent": 0}}, False),
    ("prestage typo", {"prestage": {"mod": "all"}}, False),
    ("gate", gate(), True),
    ("gate after canary", gate(after="canary"), True),
    ("gate after batch 2", gate(after=2), True),
    ("gate after batch 0", gate(after=0), False),
    ("gate after a word", gate(after="first"), False),
    ("gate name uppercase", gate(name="Bake"), False),
    ("gate name ending in -", gate(name="bake-"), False),
    ("gate name too long", gate(name="b" * 64), False),
    ("unknown gate kind", gate(kind="sleep"), False),
    ("bake without duration", {"gates": [{"name": "g", "kind": "bake", "after": 1}]}, False),
    ("bake with before", gate(before="every"), False),
    ("window", window(days=["mon-fri", "sun"], timezone="Europe/Berlin"), True),
    ("window days as a string", window(days="fri-mon"), True),
    ("window day in capitals", window(days=["Mon"]), True),
    ("window unknown day", window(days=["funday"]), False),
    ("window no days", window(days=[]), False),
    ("window until midnight", window(start="18:00", end="24:00"), True),
    ("window start at 24:00", window(start="24:00"), False),
    ("window unquoted time", window(start=1320), False),
    ("window minutes 60", window(end="06:60"), False),
    ("window with after", window(after=1), False),
    (
        "alerts",
        {
            "gates": [
                {
                    "name": "a",
                    "kind": "alerts",
                    "prometheus": "http://p:9090",
                    "match": {"severity": "critical"},
                    "before": "after-canary",
                }
            ]
        },
        True,
    ),
    (
        "alerts bad before",
        {
            "gates": [
                {"name": "a", "kind": "alerts", "prometheus": "http://p:9090", "before": "never"}
            ]
        },
        False,
    ),
    (
        "analysis",
        {
            "gates": [
                {
                    "name": "e",
                    "kind": "analysis",
                    "after": "canary",
                    "prometheus": "https://p",
                    "query": "up",
                    "count": 3,
                    "success": "result < 0.01",
                    "failure_limit": 1,
                }
            ]
        },
        True,
    ),
    (
        "analysis empty query",
        {
            "gates": [
                {
                    "name": "e",
                    "kind": "analysis",
                    "after": 1,
                    "prometheus": "https://p",
                    "query": "",
                    "success": "result < 1",
                }
            ]
        },
        False,
    ),
    (
        "analysis ftp prometheus",
        {
            "gates": [
                {
                    "name": "e",
                    "kind": "analysis",
                    "after": 1,
                    "prometheus": "ftp://p",
                    "query": "up",
                    "success": "result < 1",
                }
            ]
        },
        False,
    ),
    (
        "notify",
        {
            "notify": [
                {
                    "url": "https://h/x",
                    "events": ["halted"],
                    "headers": {"Authorization": "Bearer x"},
                }
            ]
        },
        True,
    ),
    ("notify unknown event", {"notify": [{"url": "https://h/x", "events": ["exploded"]}]}, False),
    ("notify no events", {"notify": [{"url": "https://h/x", "events": []}]}, False),
    ("notify without url", {"notify": [{"events": ["halted"]}]}, False),
]

# Rules a JSON Schema cannot state (across fields, or outside the file): the schema accepts
# these and the loader refuses them. Listed so that the difference is deliberate.
POLICY_GAPS = [
    ("deadline not above min_healthy_time", {"health": {"min_healthy_time": "10m"}}),
    ("duplicate gate names", {"gates": [gate()["gates"][0], gate()["gates"][0]]}),
    ("gate after a canary that is 0", {"batches": {"canary": 0}, **gate(after="canary")}),
    (
        "analysis without a condition",
        {
            "gates": [
                {
                    "name": "e",
                    "kind": "analysis",
                    "after": 1,
                    "prometheus": "http://p",
                    "query": "up",
                }
            ]
        },
    ),
    (
        "failure_limit not below count",
        {
            "gates": [
                {
                    "name": "e",
                    "kind": "analysis",
                    "after": 1,
                    "prometheus": "http://p",
                    "query": "up",
                    "success": "result < 1",
                    "failure_limit": 1,
                }
            ]
        },
    ),
    (
        "bad condition",
        {
            "gates": [
                {
                    "name": "e",
                    "kind": "analysis",
                    "after": 1,
                    "prometheus": "http://p",
                    "query": "up",
                    "success": "result <<< 1",
                }
            ]
        },
    ),
    ("unknown time zone", window(timezone="Mars/Olympus")),
    ("window start equals end", window(start="06:00", end="06:00")),
    ("integer field as 8080.0", check(type="tcp", port=8080.0)),
]


def node(**fields: object) -> dict[str, Any]:
    return {"id": "n1", "address": "10.0.0.1:7000", **fields}


INVENTORY_CASES = [
    ("one node", {"nodes": [node()]}, True),
    ("no nodes", {"nodes": []}, False),
    ("nodes missing", {"token_file": "token"}, False),
    ("typo'd field", {"nodes": [node(lables={"rack": "r1"})]}, False),
    ("typo'd top-level field", {"node": [node()]}, False),
    ("id with a space", {"nodes": [node(id="node 1")]}, False),
    ("empty id", {"nodes": [node(id="")]}, False),
    ("address without port", {"nodes": [node(address="10.0.0.1")]}, False),
    ("ipv6 address", {"nodes": [node(address="[::1]:7000")]}, True),
    ("port 0", {"nodes": [node(address="h:0")]}, False),
    ("port 65535", {"nodes": [node(address="h:65535")]}, True),
    ("port 65536", {"nodes": [node(address="h:65536")]}, False),
    ("port with a leading zero", {"nodes": [node(address="h:07000")]}, True),
    ("integer label value", {"nodes": [node(labels={"rack": 3})]}, True),
    ("boolean label value", {"nodes": [node(labels={"rack": True})]}, False),
    ("empty label name", {"nodes": [node(labels={"": "x"})]}, False),
    (
        "token and ca files",
        {"token_file": "t", "ca_file": "ca.pem", "nodes": [node(token_file="other", ca_file=None)]},
        True,
    ),
    ("empty token file", {"nodes": [node(token_file="")]}, False),
    (
        "mirror",
        {"nodes": [node()], "registry_mirrors": [{"match": {"site": "eu"}, "registry": "m:5000"}]},
        True,
    ),
    (
        "mirror without labels",
        {"nodes": [node()], "registry_mirrors": [{"match": {}, "registry": "m:5000"}]},
        False,
    ),
    (
        "mirror without port",
        {"nodes": [node()], "registry_mirrors": [{"match": {"a": "b"}, "registry": "m"}]},
        False,
    ),
]

INVENTORY_GAPS = [
    ("duplicate ids", {"nodes": [node(), node(address="10.0.0.2:7000")]}),
    ("duplicate addresses", {"nodes": [node(), node(id="n2", address="10.0.0.1:7000")]}),
]


def _cases(cases: list[tuple[str, Any, bool]]) -> list[Any]:
    return [pytest.param(data, valid, id=name) for name, data, valid in cases]


@pytest.mark.parametrize(("data", "valid"), _cases(POLICY_CASES))
def test_policy_schema_agrees_with_the_loader(data: object, valid: bool) -> None:
    problem = parser_accepts("policy", data)
    errors = schema_errors("policy", data)
    assert (problem is None) == valid, problem
    assert (not errors) == valid, errors or "the schema accepts it"


@pytest.mark.parametrize(("data", "valid"), _cases(INVENTORY_CASES))
def test_inventory_schema_agrees_with_the_loader(data: object, valid: bool) -> None:
    problem = parser_accepts("inventory", data)
    errors = schema_errors("inventory", data)
    assert (problem is None) == valid, problem
    assert (not errors) == valid, errors or "the schema accepts it"


@pytest.mark.parametrize(
    ("kind", "data"),
    [pytest.param("policy", d, id=n) for n, d in POLICY_GAPS]
    + [pytest.param("inventory", d, id=n) for n, d in INVENTORY_GAPS],
)
def test_rules_only_the_loader_checks(kind: Kind, data: object) -> None:
    assert schema_errors(kind, data) == []
    assert parser_accepts(kind, data) is not None


# -- (d) rollout schema ---------------------------------------------------------------------


def rollout_cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("rollout")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rollout"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_rollout_schema_prints_the_schema() -> None:
    proc = rollout_cli("schema", "policy")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json_schema("policy")


def test_rollout_schema_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "inventory.schema.json"
    proc = rollout_cli("schema", "inventory", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert out.read_text(encoding="utf-8") == schema.schema_text("inventory")


def test_rollout_schema_bad_kind_exits_2() -> None:
    proc = rollout_cli("schema", "inventroy")
    assert proc.returncode == 2
    assert "inventroy" in proc.stderr and "policy" in proc.stderr


def test_write_and_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m rollout.schema --check`` fails on a stale copy; ``--write`` repairs it."""
    originals = dict(schema.DOCS)
    docs = {kind: tmp_path / path.name for kind, path in originals.items()}
    for kind, path in docs.items():
        text = originals[kind].read_text(encoding="utf-8")
        stale = schema.render_doc(text, {key: "| old |\n" for key in field_tables(kind)})
        path.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(schema, "DOCS", docs)
    monkeypatch.setattr(schema, "ROOT", tmp_path)
    monkeypatch.setattr(schema, "schema_path", lambda kind: tmp_path / f"{kind}.schema.json")
    assert schema.main(["--check"]) == 1
    assert schema.main(["--write"]) == 0
    assert schema.main(["--check"]) == 0
    for kind, path in docs.items():
        assert path.read_text(encoding="utf-8") == originals[kind].read_text(encoding="utf-8")
        assert (tmp_path / f"{kind}.schema.json").read_text(encoding="utf-8") == (
            schema.schema_text(kind)
        )
