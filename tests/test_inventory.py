"""Inventory loading, token file resolution, every error message, and dump -> load."""

from __future__ import annotations

import doctest
import os
from pathlib import Path
from typing import Any

import pytest

import rollout.inventory
from rollout.errors import InputError
from rollout.inventory import Inventory, dump_inventory, load_inventory, split_address
from rollout.model import Node


def test_docstring_examples() -> None:
    result = doctest.testmod(rollout.inventory)
    assert result.attempted > 0 and result.failed == 0


def write(tmp_path: Path, text: str, name: str = "inventory.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
token_file: token
nodes:
  - id: node-01
    address: 127.0.0.2:7000
    labels: {rack: r1}
  - id: node_02.b
    address: "[::1]:7001"
    labels: {rack: 2, zone: a}
    token_file: other-token
  - id: n3
    address: agent3.example.com:7000
    token_file: /etc/rollout/t3
""",
    )
    inv = load_inventory(path)
    assert isinstance(inv, Inventory)
    assert inv.source == str(path)
    assert inv.ids == ("node-01", "node_02.b", "n3")
    n1, n2, n3 = inv.nodes
    assert n1 == Node("node-01", "127.0.0.2:7000", {"rack": "r1"}, str(tmp_path / "token"))
    assert n2.labels == {"rack": "2", "zone": "a"}
    assert n2.token_file == str(tmp_path / "other-token")
    assert n2.host == "[::1]"
    assert n3.labels == {} and n3.token_file == "/etc/rollout/t3"
    assert inv.token_file == str(tmp_path / "token")
    assert inv.node("n3") is n3
    with pytest.raises(KeyError):
        inv.node("nope")


def test_relative_inventory_path_gives_absolute_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fleet").mkdir()
    write(tmp_path / "fleet", "token_file: tok\nnodes: [{id: a, address: 'h:1'}]\n")
    monkeypatch.chdir(tmp_path)
    inv = load_inventory("fleet/inventory.yaml")
    assert inv.nodes[0].token_file == str(tmp_path / "fleet" / "tok")
    assert os.path.isabs(inv.nodes[0].token_file or "")


def test_no_token_file(tmp_path: Path) -> None:
    inv = load_inventory(write(tmp_path, "nodes: [{id: a, address: 'h:1'}]\n"))
    assert inv.nodes[0].token_file is None and inv.token_file is None


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.2:7000", "127.0.0.2", 7000),
        ("[fe80::1]:1", "[fe80::1]", 1),
        ("a-b.c:65535", "a-b.c", 65535),
    ],
)
def test_split_address(address: str, host: str, port: int) -> None:
    assert split_address(address) == (host, port)


def node(i: int, **extra: object) -> str:
    fields = {"id": f"n{i}", "address": f"127.0.0.{i}:7000", **extra}
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


ERRORS = [
    (
        f"nodes: [{node(1)}, {node(2)}, {node(3)}, {{id: n2, address: '10.0.0.9:7000'}}]",
        'nodes[3].id: duplicate id "n2" (also nodes[1])',
    ),
    (
        f"nodes: [{node(1)}, {node(2)}, {{id: x, address: '127.0.0.2:7000'}}]",
        'nodes[2].address: duplicate address "127.0.0.2:7000" (also nodes[1], n2)',
    ),
    (
        "nodes: [{id: a, address: 'Host:1'}, {id: b, address: 'host:1'}]",
        'nodes[1].address: duplicate address "host:1"',
    ),
    (
        "nodes: [{id: a, address: 127.0.0.2}]",
        'nodes[0].address: expected host:port like "127.0.0.2:7000", got "127.0.0.2"',
    ),
    (
        "nodes: [{id: a, address: 'h:'}]",
        'nodes[0].address: expected host:port like "127.0.0.2:7000", got "h:"',
    ),
    (
        "nodes: [{id: a, address: ':7000'}]",
        'nodes[0].address: expected host:port like "127.0.0.2:7000", got ":7000"',
    ),
    ("nodes: [{id: a, address: 'h:0'}]", 'nodes[0].address: port must be 1-65535, got "h:0"'),
    (
        "nodes: [{id: a, address: 'h:70000'}]",
        'nodes[0].address: port must be 1-65535, got "h:70000"',
    ),
    (
        "nodes: [{id: a, address: 'http://h:1'}]",
        'nodes[0].address: expected host:port like "127.0.0.2:7000"',
    ),
    ("nodes: [{id: a, address: 7000}]", "nodes[0].address: expected a string, got 7000"),
    ("nodes: [{id: a}]", "nodes[0].address: required field missing"),
    ("nodes: [{address: 'h:1'}]", "nodes[0].id: required field missing"),
    (
        "nodes: [{id: 'node 1', address: 'h:1'}]",
        'nodes[0].id: may only contain letters, digits, ".", "_" and "-", got "node 1"',
    ),
    (
        "nodes: [{id: 'a/b', address: 'h:1'}]",
        'nodes[0].id: may only contain letters, digits, ".", "_" and "-", got "a/b"',
    ),
    ("nodes: [{id: '', address: 'h:1'}]", "nodes[0].id: must not be empty"),
    ("nodes: [{id: 7, address: 'h:1'}]", "nodes[0].id: expected a string, got 7"),
    ("nodes: []", "nodes: the inventory lists no nodes; add at least one"),
    ("nodes:", "nodes: expected a list, got null"),
    ("nodes: {a: 1}", "nodes: expected a list, got a mapping"),
    ("token_file: t", "nodes: required field missing"),
    (
        "nodes: [{id: a, address: 'h:1', labels: [r1]}]",
        "nodes[0].labels: expected a mapping, got a list",
    ),
    (
        "nodes: [{id: a, address: 'h:1', labels: {rack: yes}}]",
        "nodes[0].labels.rack: expected a string, got true",
    ),
    (
        "nodes: [{id: a, address: 'h:1', lables: {}}]",
        "nodes[0].lables: unknown field (known: id, address, labels, token_file, ca_file)",
    ),
    (
        "tokens: t\nnodes: [{id: a, address: 'h:1'}]",
        "tokens: unknown field (known: token_file, ca_file, nodes, registry_mirrors)",
    ),
    ("token_file: ''\nnodes: [{id: a, address: 'h:1'}]", "token_file: must not be empty"),
    ("nodes: [a]", 'nodes[0]: expected a mapping, got "a"'),
]


@pytest.mark.parametrize(
    ("text", "expected"), ERRORS, ids=[f"{i}-{e[1].split(':')[0]}" for i, e in enumerate(ERRORS)]
)
def test_inventory_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(InputError) as err:
        load_inventory(path)
    message = str(err.value)
    assert "\n" not in message
    field = expected.split(":")[0]
    assert message.startswith(f"{path}: {field}: ")
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as err:
        load_inventory(path)
    assert str(err.value).startswith(f"{path}: no such inventory file")


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes:\n  - id: a\n    address: [h:1\n")
    with pytest.raises(InputError) as err:
        load_inventory(path)
    message = str(err.value)
    assert message.startswith(f"{path}: line ") and "column" in message
    assert "invalid YAML" in message and "\n" not in message


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes:\n  - id: a\n    id: b\n    address: 'h:1'\n")
    with pytest.raises(InputError) as err:
        load_inventory(path)
    assert str(err.value) == f'{path}: line 3, column 5: invalid YAML: duplicate key "id"'


@pytest.mark.parametrize("text", ["", "# nothing\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_inventory(path)
    assert str(err.value) == f"{path}: the inventory is empty; expected a mapping with nodes:"


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "- id: a\n  address: 'h:1'\n")
    with pytest.raises(InputError) as err:
        load_inventory(path)
    assert str(err.value) == (
        f"{path}: expected a mapping at the top level (with token_file and nodes), got a list"
    )


# -- dump -> load ----------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    nodes = [
        Node("node-01", "127.0.0.2:7000", {"rack": "r1"}, str(tmp_path / "token")),
        Node("node-02", "127.0.0.3:7000", {"rack": "r2", "zone": "3"}, str(tmp_path / "token")),
        Node("node-03", "127.0.0.4:7000", {}, "/elsewhere/token"),
        Node("node-04", "[::1]:7000", {"rack": "yes"}, str(tmp_path / "token")),
    ]
    path = tmp_path / "inventory.yaml"
    dump_inventory(nodes, "token", path)
    inv = load_inventory(path)
    assert inv.nodes == tuple(nodes)
    text = path.read_text()
    assert "token_file: token\n" in text
    assert text.count("token_file") == 2  # the default and node-03's override
    assert not list(tmp_path.glob(".*.tmp"))


def test_round_trip_without_tokens(tmp_path: Path) -> None:
    nodes = [Node(f"n{i}", f"10.0.0.{i}:7000", {"rack": f"r{i % 2}"}) for i in range(1, 6)]
    path = tmp_path / "inv.yaml"
    dump_inventory(nodes, None, path)
    assert load_inventory(path).nodes == tuple(nodes)
    dump_inventory(nodes[:2], None, path)  # replaces the file
    assert len(load_inventory(path).nodes) == 2


def test_round_trip_relative_override(tmp_path: Path) -> None:
    nodes = [Node("a", "h:1", {}, "mine"), Node("b", "h:2", {}, None)]
    path = tmp_path / "inv.yaml"
    dump_inventory(nodes, None, path)
    loaded = load_inventory(path).nodes
    assert loaded[0].token_file == str(tmp_path / "mine")  # relative to the file's directory
    assert loaded[1].token_file is None


# -- the fast path (libyaml events, plain node checks) gives what the pure path gives --------
FAST_CASES = [
    "a: 1\nb: [x, 'y', 0x10, 1_000, 1.5, .inf, yes, ~, null, '', 2024-01-02]\n",
    "a: &x {k: v}\nb: *x\nc: &s hello\nd: *s\n",
    "nodes:\n  - id: n1\n    address: h:1\n    labels: {rack: 3, zone: a}\n",
    "? [a, b]\n: complex key\n",  # the pure loader refuses it
    "base: &b {x: 1}\nmine:\n  <<: *b\n  y: 2\n",  # merge keys
    "s: !!set {a, b}\n",
    "a: 1\n---\nb: 2\n",  # two documents
    "just a scalar\n",
    "",
    "- 1\n- [2, [3, {four: 4}]]\n",
    "a: !!str 12\nb: !!int '7'\nc: \"quoted: yes\"\n",
    "a: 1\na: 2\n",
    "top:\n  inner: {k: 1, k: 2}\n",
    "a: [unclosed\n",
    "a: *nowhere\n",
    "a: !custom x\n",
    "a:\nb: [NO, off, 0b101, 012, 190:20:30, 1e3, -.5, '~', \"1\", Null, node-1, 10.0.0.1:70]\n",
]


@pytest.mark.parametrize("text", FAST_CASES)
def test_fast_yaml_matches_the_pure_loader(tmp_path: Path, text: str) -> None:
    import yaml

    from rollout import yamlfile

    path = write(tmp_path, text, "doc.yaml")
    try:
        expected: object = ("ok", yaml.load(text, Loader=yamlfile._UniqueKeyLoader))
    except yaml.YAMLError:
        expected = "error"
    try:
        got: object = ("ok", yamlfile.read_yaml(path, kind="file"))
    except InputError as exc:
        got = "error"
        if "duplicate key" in text or text.count("a: ") > 1:
            assert "line " in str(exc) and "column" in str(exc)
    assert got == expected


@pytest.mark.parametrize(
    "nodes",
    [
        [{"id": "n1", "address": "h:1", "labels": {"rack": True}}],  # bool: not a label text
        [{"id": "n1", "address": "h:1", "labels": None}],
        [{"id": "n1", "address": "h:0"}],
        [{"id": "n 1", "address": "h:1"}],
        [{"id": "n1", "address": "H:1"}, {"id": "n2", "address": "h:1"}],
        [{"id": "n1", "address": "h:1", "extra": 1}],
        [{"id": "n1", "address": "h:1", "token_file": ""}],
        [{"id": "n1", "address": "h:1", "labels": {"": "x"}}],
        [{"id": "n1", "address": "h:1", "labels": {"rack": 3}, "token_file": "t", "ca_file": "c"}],
        [{"id": "n1", "address": "[::1]:7000"}, {"id": "n2", "address": "[::1]:7001"}],
    ],
)
def test_plain_node_check_agrees_with_the_models(nodes: list[dict[str, object]]) -> None:
    from rollout.inventory import _InventoryFile, _plain_nodes, parse_inventory

    data = {"token_file": "tok", "nodes": nodes}
    try:
        _InventoryFile.model_validate(data)
        valid = True
    except Exception:
        valid = False
    plain = _plain_nodes(nodes)
    assert plain is None or valid  # the plain loop never accepts what the models refuse
    if valid:
        inv = parse_inventory(data, "inv.yaml", "/base")
        models = _InventoryFile.model_validate(data).nodes
        assert [(n.id, n.address, dict(n.labels)) for n in inv.nodes] == [
            (e.id, e.address, dict(e.labels)) for e in models
        ]


def test_plain_documents_take_the_fast_path() -> None:
    from rollout import yamlfile

    if yamlfile._FastLoader is None:
        pytest.skip("PyYAML without libyaml")
    import yaml

    for i in (0, 1, 2, 9, 10, 16):  # the fast path's own answer is the pure loader's
        text = FAST_CASES[i]
        expected = yaml.load(text, Loader=yamlfile._UniqueKeyLoader)
        assert expected is not None
        assert yamlfile._FastLoader(text).build() == expected


IMPLICIT_SCALARS = [
    "", "~", "null", "Null", "NULL", "nul", "yes", "Yes", "YES", "no", "No", "NO", "on", "off",
    "On", "OFF", "true", "False", "y", "n", "0", "00", "07", "08", "0x1F", "0b101", "-0b11",
    "+12", "1_000", "1:30", "190:20:30", "1.5", "1.", ".5", "-.inf", ".NaN", "1e3", "1.0e+3",
    "2024-01-02", "2024-1-2 10:20:30", "2024-01-02T10:20:30Z", "2024-01-02 10:20:30.5 +01:00",
    "<<", "=", "node-1", "10.0.0.1:7000", "r1", "12a", "0.1.2", "-", "+", ".",
]  # fmt: skip


@pytest.mark.parametrize("text", IMPLICIT_SCALARS)
def test_the_fast_paths_resolver_table_tags_a_plain_scalar_as_resolve_does(text: str) -> None:
    import yaml

    from rollout import yamlfile

    if yamlfile._FastLoader is None:
        pytest.skip("PyYAML without libyaml")
    resolve: Any = yamlfile._CFastLoader("").resolve  # typeshed leaves it untyped
    want = resolve(yaml.ScalarNode, text, (True, False))
    table, everywhere = yamlfile._RESOLVERS
    pattern, tags = table.get(text[:1], everywhere)
    found = pattern.match(text) if tags else None
    got = tags[found.lastindex - 1] if found is not None and found.lastindex else yamlfile._STR
    assert got == want
