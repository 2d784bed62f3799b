"""The inventory file: which nodes make up the fleet and how to reach their agents.

::

    # inventory.yaml
    token_file: token            # default for all nodes, relative to this file's directory
    ca_file: ca.pem              # optional: agents speak HTTPS, verified against this CA
    registry_mirrors:            # optional, pull mode: per-site mirrors, first match wins
      - match: {site: eu}
        registry: mirror-eu.example:5000
    nodes:
      - id: node-01
        address: 127.0.0.2:7000  # agent host:port
        labels: {rack: r1}
        token_file: other-token  # optional override (ca_file too)

Design and invariants of a loaded `Inventory`:

- at least one node; ids are unique and use only ``[A-Za-z0-9._-]`` (they end up in file
  names, metric labels and URLs); addresses are ``host:port`` (``[v6]:port`` for IPv6),
  port 1-65535, and unique (host compared case-insensitively);
- labels are a str -> str mapping (integer values such as ``rack: 3`` are read as ``"3"``);
- ``token_file`` and ``ca_file`` paths are resolved to absolute paths against the
  inventory file's directory (``~`` expanded); whether the files exist is checked by
  whoever reads them, not here: loading reads exactly one file. A node with a ``ca_file``
  is reached over HTTPS, its agent's certificate verified against that CA; a node without
  one over plain HTTP.

Loading is fast at fleet scale (100,000 nodes): `_plain_nodes` checks the node entries
with the same regexes and rules in one plain loop and builds the nodes directly; the
pydantic models below stay the definition (and the documented schema), and judge every
inventory the plain loop does not find plainly valid, so their messages are the ones a
user sees. The plain loop only ever accepts what the models accept, with the same result.

Errors are one `InputError` line ``<file>: <field.path>: <problem>``, built by the same
machinery as policy errors (rollout.problems, rollout.yamlfile). `dump_inventory` writes
the format back (the local fleet uses it); ``load_inventory(dump_inventory(...))`` gives
the same nodes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic import model_validator as _model_validator

from rollout.errors import InputError
from rollout.model import Mirror, Node
from rollout.problems import FieldProblem, validation_message
from rollout.runtime import paused_gc
from rollout.units import show
from rollout.yamlfile import read_yaml

__all__ = ["Inventory", "dump_inventory", "load_inventory", "parse_inventory", "split_address"]

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_ADDRESS_RE = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})")


def split_address(address: str) -> tuple[str, int]:
    """Split an agent address into host and port; ValueError with a user-facing message.

    >>> split_address("127.0.0.2:7000"), split_address("[::1]:7000")
    (('127.0.0.2', 7000), ('[::1]', 7000))
    """
    m = _ADDRESS_RE.fullmatch(address)
    if not m:
        raise ValueError(f'expected host:port like "127.0.0.2:7000", got {show(address)}')
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {show(address)}")
    return m.group("host"), port


def _check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError(f'may only contain letters, digits, ".", "_" and "-", got {show(value)}')
    return value


def _check_address(value: str) -> str:
    split_address(value)
    return value


def _labels_as_strings(value: object) -> object:
    """YAML reads ``rack: 3`` as an int; a label value is a string, so take its text."""
    if not isinstance(value, Mapping):
        return value

    def text(v: object) -> object:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    return {text(k): text(v) for k, v in value.items()}


_CONFIG = ConfigDict(extra="forbid", frozen=True)
_Path = Annotated[str, Field(min_length=1)]


class _NodeEntry(BaseModel):
    model_config = _CONFIG

    id: Annotated[str, Field(min_length=1), AfterValidator(_check_id)] = Field(
        description=(
            "Unique node name; it appears in logs, metrics labels, reports and file names."
        )
    )
    address: Annotated[str, AfterValidator(_check_address)] = Field(
        description=(
            "Where the node's agent listens. Host is a name or IPv4 address, or an IPv6 "
            "address in brackets (`[::1]:7000`); port 1-65535. Unique across the fleet (host "
            "compared case-insensitively)."
        )
    )
    labels: Annotated[
        dict[Annotated[str, Field(min_length=1)], str], BeforeValidator(_labels_as_strings)
    ] = Field(
        default_factory=dict,
        description=(
            "Free-form labels, e.g. `{rack: r1, zone: a}`. A policy's `batches.spread_by` "
            'names one of them. Integer values are read as text (`rack: 3` is `"3"`); other '
            "non-strings must be quoted."
        ),
    )
    token_file: _Path | None = Field(
        default=None,
        description=(
            "This node's token file, overriding the top-level `token_file`; relative to the "
            "inventory file's directory."
        ),
    )
    ca_file: _Path | None = Field(
        default=None,
        description=(
            "This node's CA file, overriding the top-level `ca_file`; relative to the "
            "inventory file's directory. A node with a CA file is reached over HTTPS, one "
            "without over plain HTTP."
        ),
    )


class _MirrorEntry(BaseModel):
    model_config = _CONFIG

    match: Annotated[
        dict[Annotated[str, Field(min_length=1)], str], BeforeValidator(_labels_as_strings)
    ] = Field(
        min_length=1,
        description="Labels a node must all have for this entry to apply, e.g. `{site: eu}`.",
    )
    registry: Annotated[str, AfterValidator(_check_address)] = Field(
        description="The mirror's `host:port`; those nodes pull images from it, by digest."
    )


class _InventoryFile(BaseModel):
    model_config = _CONFIG

    token_file: _Path | None = Field(
        default=None,
        description=(
            "Default file holding the agents' bearer token, for every node without its own. "
            "A relative path is relative to the inventory file's directory; `~` is expanded. "
            "`null`: nodes without their own are reached without a token."
        ),
    )
    ca_file: _Path | None = Field(
        default=None,
        description=(
            "Default PEM CA certificate(s) for every node without its own: those nodes' "
            "agents are reached over HTTPS and their certificates verified against it. "
            "Resolved like `token_file`."
        ),
    )
    nodes: list[_NodeEntry] = Field(
        min_length=1,
        description="The fleet, in order. Without `spread_by` the planner keeps this order.",
    )
    registry_mirrors: list[_MirrorEntry] = Field(
        default_factory=list,
        description=(
            "Pull mode: per-site registry mirrors. A node pulls from the `registry` of the "
            "first entry whose `match` labels it all has, instead of the registry the image "
            "reference names; the same repository, by digest, so it gets the same bytes or "
            "fails the digest check. The controller itself resolves tags at the registry the "
            "reference names."
        ),
    )

    @_model_validator(mode="after")
    def _unique(self) -> _InventoryFile:
        ids: dict[str, int] = {}
        addresses: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            if node.id in ids:
                raise FieldProblem(
                    f"nodes[{i}].id",
                    f"duplicate id {show(node.id)} (also nodes[{ids[node.id]}])",
                )
            ids[node.id] = i
            host, port = split_address(node.address)
            key = f"{host.lower()}:{port}"
            if key in addresses:
                raise FieldProblem(
                    f"nodes[{i}].address",
                    f"duplicate address {show(node.address)} "
                    f"(also nodes[{addresses[key]}], {self.nodes[addresses[key]].id})",
                )
            addresses[key] = i
        return self


@dataclass(frozen=True)
class Inventory:
    """A validated fleet: ``nodes`` in file order, ``source`` the file it came from.

    ``token_file`` and ``ca_file`` are the resolved top-level defaults (each Node already
    carries its own resolved files, so callers rarely need them).
    """

    nodes: tuple[Node, ...]
    source: str
    token_file: str | None = None
    ca_file: str | None = None
    mirrors: tuple[Mirror, ...] = ()

    def node(self, node_id: str) -> Node:
        """The node with this id; KeyError if there is none."""
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(n.id for n in self.nodes)


_NODE_KEYS = frozenset({"id", "address", "labels", "token_file", "ca_file"})
_PlainNode = tuple[str, str, dict[str, str], str | None, str | None]


def _label_text(v: object) -> object:
    return str(v) if type(v) is int else v  # as _labels_as_strings (bool is not int here)


def _plain_nodes(entries: object) -> list[_PlainNode] | None:
    """The node entries as (id, address, labels, token_file, ca_file) when each one is
    plainly valid and no id or address repeats; None when anything is not (or is
    unusual): then the models judge, and word the problem.

    >>> _plain_nodes([{"id": "n1", "address": "h:1", "labels": {"rack": 3}}])
    [('n1', 'h:1', {'rack': '3'}, None, None)]
    >>> _plain_nodes([{"id": "n1", "address": "h:1"}, {"id": "n1", "address": "h:2"}]) is None
    True
    """
    if type(entries) is not list:
        return None
    out: list[_PlainNode] = []
    ids: set[str] = set()
    addresses: set[str] = set()
    id_ok, address_match = _ID_RE.fullmatch, _ADDRESS_RE.fullmatch
    for e in entries:
        if type(e) is not dict or not e.keys() <= _NODE_KEYS:
            return None
        node_id, address = e.get("id"), e.get("address")
        if type(node_id) is not str or type(address) is not str or not id_ok(node_id):
            return None
        m = address_match(address)
        if m is None:
            return None
        host, digits = m.group("host", "port")
        port = int(digits)
        key = f"{host.lower()}:{port}"
        if not 1 <= port <= 65535 or node_id in ids or key in addresses:
            return None
        ids.add(node_id)
        addresses.add(key)
        raw = e.get("labels", {})
        if type(raw) is not dict:
            return None
        labels: dict[str, str] = {}
        for k, v in raw.items():
            if type(k) is not str:
                k = _label_text(k)
            if type(v) is not str:
                v = _label_text(v)
            if type(k) is not str or not k or type(v) is not str:
                return None
            labels[k] = v
        token_file, ca_file = e.get("token_file"), e.get("ca_file")
        for f in (token_file, ca_file):
            if f is not None and (type(f) is not str or not f):
                return None
        out.append((node_id, address, labels, token_file, ca_file))
    return out


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    return os.path.abspath(base / Path(path).expanduser())


def load_inventory(path: str | os.PathLike[str]) -> Inventory:
    """Read an inventory file; raise InputError with one line ``<file>: <field>: <problem>``."""
    source = os.fspath(path)
    with paused_gc():  # 100,000 nodes are ~2M objects that all stay: nothing to collect
        data = read_yaml(
            source,
            kind="inventory file",
            hint="write one listing nodes (see docs/inventory.md)",
        )
        return parse_inventory(data, source, Path(source).parent)


def parse_inventory(data: object, source: str, base_dir: str | os.PathLike[str] = ".") -> Inventory:
    """Validate an already-parsed inventory; relative token and CA files resolve against
    ``base_dir``.

    >>> inv = parse_inventory(
    ...     {"token_file": "token", "nodes": [{"id": "n1", "address": "10.0.0.1:7000"}]},
    ...     "inv.yaml", "/etc/rollout")
    >>> inv.nodes[0].token_file, inv.nodes[0].labels
    ('/etc/rollout/token', {})
    >>> parse_inventory({"nodes": []}, "inv.yaml")
    Traceback (most recent call last):
    rollout.errors.InputError: inv.yaml: nodes: the inventory lists no nodes; add at least one
    """
    if data is None:
        raise InputError(f"{source}: the inventory is empty; expected a mapping with nodes:")
    if not isinstance(data, Mapping):
        raise InputError(
            f"{source}: expected a mapping at the top level (with token_file and nodes), "
            f"got {show(data)}"
        )
    entries = data.get("nodes")
    plain = _plain_nodes(entries) if isinstance(entries, list) and entries else None
    first_node = entries[:1] if isinstance(entries, list) else entries
    try:
        if plain is not None:  # the models judge the rest, with one node for `nodes`
            parsed = _InventoryFile.model_validate({**data, "nodes": first_node})
        else:
            parsed = _InventoryFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if tuple(first["loc"]) == ("nodes",) and first["type"] == "too_short":
            raise InputError(
                f"{source}: nodes: the inventory lists no nodes; add at least one"
            ) from exc
        raise InputError(validation_message(exc, _InventoryFile, source)) from exc
    base = Path(base_dir)
    default = _resolve(parsed.token_file, base)
    default_ca = _resolve(parsed.ca_file, base)
    if plain is None:
        plain = [(e.id, e.address, dict(e.labels), e.token_file, e.ca_file) for e in parsed.nodes]
    resolved: dict[str, str | None] = {}  # per-node files repeat: resolve each path once

    def own(path: str | None, fallback: str | None) -> str | None:
        if not path:
            return fallback
        if path not in resolved:
            resolved[path] = _resolve(path, base)
        return resolved[path]

    nodes = tuple(
        Node(node_id, address, labels, own(token, default), own(ca, default_ca))
        for node_id, address, labels, token, ca in plain
    )
    mirrors = tuple(Mirror(dict(m.match), m.registry) for m in parsed.registry_mirrors)
    return Inventory(
        nodes=nodes, source=source, token_file=default, ca_file=default_ca, mirrors=mirrors
    )


def dump_inventory(
    nodes: Iterable[Node],
    token_file: str | os.PathLike[str] | None,
    path: str | os.PathLike[str],
    ca_file: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``nodes`` as an inventory file at ``path`` (replacing it atomically).

    ``token_file`` and ``ca_file`` become the top-level defaults, written as given (a
    relative one is relative to ``path``'s directory, as `load_inventory` reads it). A
    node's own ``token_file`` or ``ca_file`` is written only where it differs from that
    default.
    """
    target = Path(path)
    base = target.parent
    default = os.fspath(token_file) if token_file is not None else None
    default_ca = os.fspath(ca_file) if ca_file is not None else None
    resolved = {"token_file": _resolve(default, base), "ca_file": _resolve(default_ca, base)}
    body: dict[str, Any] = {}
    if default is not None:
        body["token_file"] = default
    if default_ca is not None:
        body["ca_file"] = default_ca
    entries: list[dict[str, Any]] = []
    for node in nodes:
        entry: dict[str, Any] = {"id": node.id, "address": node.address}
        if node.labels:
            entry["labels"] = dict(node.labels)
        for key, own in (("token_file", node.token_file), ("ca_file", node.ca_file)):
            if own is not None and _resolve(own, base) != resolved[key]:
                entry[key] = own
        entries.append(entry)
    body["nodes"] = entries
    text = "# rollout inventory (format: docs/inventory.md)\n" + yaml.safe_dump(
        body, sort_keys=False, default_flow_style=False
    )
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
