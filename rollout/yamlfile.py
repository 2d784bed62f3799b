"""Reading one YAML file (policy or inventory) with errors a user can act on.

`read_yaml` returns the parsed document or raises one InputError line naming the file,
and for syntax errors the line and column. A key given twice in one mapping is an error
(plain YAML silently keeps the last one, which hides typos in long inventories).

Two loaders, one answer. A 100,000-node inventory takes ~14 s in PyYAML's pure-Python
parser, so when libyaml is there the file is parsed by its C parser (`_FastLoader`) and
turned into Python values by `_FastLoader.build`, a small constructor for the plain
cases (mappings, sequences, strings; other scalars through SafeConstructor's own
functions, so `0x10`, `1_000`, `yes`, `~` mean what they always did) with the duplicate
key check built in, and the implicit resolvers looked up once per first character (no
`resolve` call per scalar, no path resolvers to consult in a SafeLoader). Anything
else (a syntax error, a duplicate key, a merge key `<<`, a set or omap, a custom tag, a
recursive alias) makes the fast path give up, and the pure `_UniqueKeyLoader` reads the
text again: its result, or its error with the precise line and column, is the answer.
So the fast path only ever returns what the pure loader would have returned.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rollout.errors import InputError
from rollout.units import show


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable key: let the base class report it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


class _GiveUp(Exception):
    """The fast path does not handle this document: the pure loader reads it."""


_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_NO_KEY = object()  # a mapping frame waiting for its next key


class _CFastLoader(yaml.CSafeLoader):
    """libyaml's parser; values built straight from its events (no node tree).

    PyYAML's composer (even the C one) calls back into the Python resolver three times
    per node and builds a Mark pair for each; for plain documents nothing needs them.
    `build` keeps a stack of open containers instead, resolves implicit tags with the
    loader's own implicit resolvers (`_RESOLVERS`: the tag of a plain scalar
    depends on its text alone here), and constructs scalars other than strings with
    SafeConstructor's own functions. It raises `_GiveUp` (or a YAMLError) on anything it
    does not handle.
    """

    def build(self) -> object:
        try:
            return self._build()
        finally:
            self.dispose()

    def _build(self) -> object:
        # One loop over the events, with the innermost open container in locals (`top`,
        # `is_list`, and for a mapping the `key` waiting for its value): the hot path,
        # a plain scalar, is a few attribute reads and a dict lookup.
        get = self.get_event
        values: dict[tuple[str, str], Any] = {}
        anchors: dict[str, Any] = {}
        constructors = self.yaml_constructors
        resolvers, everywhere = _RESOLVERS
        scalar_event, mapping_start = yaml.ScalarEvent, yaml.MappingStartEvent
        sequence_start, alias_event = yaml.SequenceStartEvent, yaml.AliasEvent
        ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
        stack: list[tuple[Any, bool, Any]] = []
        top: Any = None  # None: at the document's root
        is_list = False
        key: Any = _NO_KEY
        if not isinstance(get(), yaml.StreamStartEvent):
            raise _GiveUp("no stream")
        if isinstance(get(), yaml.StreamEndEvent):
            return None  # an empty file
        while True:
            ev: Any = get()
            cls = type(ev)
            if cls is scalar_event:
                text, tag = ev.value, ev.tag
                if tag is None or tag == "!":
                    tag = _STR  # quoted, or plain and no implicit resolver matches
                    if ev.implicit[0]:
                        pattern, candidates = resolvers.get(text[:1], everywhere)
                        if candidates and (found := pattern.match(text)) is not None:
                            tag = candidates[found.lastindex - 1 if found.lastindex else 0]
                if tag == _STR:
                    value: Any = text
                elif (tag, text) in values:
                    value = values[tag, text]
                else:
                    make = constructors.get(tag)
                    if make is None or tag in (_MAP, _SEQ):
                        raise _GiveUp(tag)  # merge keys, custom tags
                    value = values[tag, text] = make(self, yaml.ScalarNode(tag, text))
                if ev.anchor is not None:
                    if ev.anchor in anchors:
                        raise _GiveUp("duplicate anchor")
                    anchors[ev.anchor] = value
            elif cls is mapping_start or cls is sequence_start:
                default = _MAP if cls is mapping_start else _SEQ
                tag = ev.tag
                if tag is not None and tag != "!" and tag != default:
                    raise _GiveUp(tag)  # sets, omaps, pairs, custom tags
                container: Any = {} if cls is mapping_start else []
                if ev.anchor is not None:
                    if ev.anchor in anchors:
                        raise _GiveUp("duplicate anchor")
                    anchors[ev.anchor] = container
                stack.append((top, is_list, key))
                top, is_list, key = container, cls is sequence_start, _NO_KEY
                continue
            elif cls in ends:
                value = top
                top, is_list, key = stack.pop()
            elif cls is alias_event:
                if ev.anchor not in anchors:
                    raise _GiveUp("undefined alias")
                value = anchors[ev.anchor]
            else:
                raise _GiveUp(cls.__name__)
            if top is None:  # the document's root value is complete
                break
            if is_list:
                top.append(value)
            elif key is _NO_KEY:
                if isinstance(value, dict | list) or value in top:
                    raise _GiveUp("complex or duplicate key")  # the pure loader words it
                key = value
            else:
                top[key] = value
                key = _NO_KEY
        if not isinstance(get(), yaml.DocumentEndEvent) or not isinstance(
            get(), yaml.StreamEndEvent
        ):
            raise _GiveUp("more than one document")
        return value


# One regular expression for a first character's resolvers, and their tags in order.
_Resolvers = tuple[re.Pattern[str], tuple[str, ...]]
_PLAIN_FLAGS = re.VERBOSE | re.UNICODE


def _alternation(resolvers: Sequence[tuple[str, re.Pattern[str]]]) -> _Resolvers:
    """The resolvers' patterns as one alternation, each in a capturing group of its own:
    `match` tries them left to right and takes the first that matches, as `resolve`'s
    loop does, and `lastindex` says which (the patterns have no groups of their own; one
    that has, or other flags, is tried alone after the ones before it failed)."""
    tags = tuple(tag for tag, _ in resolvers)
    if not resolvers:
        return re.compile("(?!)"), tags  # matches nothing
    if all(p.groups == 0 and not p.flags & ~_PLAIN_FLAGS for _, p in resolvers):
        parts = [f"({'(?x:' if p.flags & re.VERBOSE else '(?:'}{p.pattern}))" for _, p in resolvers]
        return re.compile("|".join(parts)), tags
    raise TypeError("implicit resolvers with groups or flags: build cannot combine them")


def _implicit_resolvers(
    loader: type[yaml.resolver.BaseResolver],
) -> tuple[dict[str, _Resolvers], _Resolvers]:
    """The loader's implicit resolvers by a plain scalar's first character (`""` for the
    empty scalar), each list followed by the wildcard ones, and the wildcard ones alone
    for any other first character: `BaseResolver.resolve`'s own lookup, done once, each
    list made one regular expression (`_alternation`: one match per scalar instead of up
    to three). With no path resolvers (SafeLoader has none) an untagged collection is a
    map or a seq, and a scalar no pattern matches (or a quoted one) is a string, as
    `resolve` returns.
    """
    if loader.yaml_path_resolvers:
        raise TypeError(f"{loader.__name__} has path resolvers: build cannot skip resolve")
    table = dict(loader.yaml_implicit_resolvers)
    everywhere = tuple(table.pop(None, ()))
    return (
        {c: _alternation((*r, *everywhere)) for c, r in table.items()},
        _alternation(everywhere),
    )


_FastLoader: type[_CFastLoader] | None = (
    _CFastLoader if getattr(yaml, "__with_libyaml__", False) else None
)
try:
    _RESOLVERS = _implicit_resolvers(_CFastLoader)
except TypeError:  # another PyYAML's resolvers: the pure loader reads every file
    _FastLoader = None


def read_yaml(path: str | os.PathLike[str], *, kind: str, hint: str = "") -> object:
    """Read and parse one YAML file; every failure is a one-line InputError naming the file.

    ``kind`` names the file in messages ("policy file"); ``hint`` is appended to the
    "no such file" message.
    """
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        tail = f"; {hint}" if hint else ""
        raise InputError(f"{source}: no such {kind}{tail}") from None
    except IsADirectoryError:
        raise InputError(f"{source}: is a directory, expected a {kind}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{source}: not a UTF-8 text file ({exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{source}: cannot read {kind}: {exc.strerror or exc}") from None
    if _FastLoader is not None:
        try:
            return _FastLoader(text).build()
        except Exception:  # any doubt: the pure loader decides, and words it precisely
            pass
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        if exc.context and exc.problem:
            problem = f"{' '.join(exc.context.split())}: {problem}"
        start = exc.context_mark
        if start is not None and mark is not None and start.line != mark.line:
            problem += f" (it began at line {start.line + 1}, column {start.column + 1})"
        raise InputError(f"{source}: {where}invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
