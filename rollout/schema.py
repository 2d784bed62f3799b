"""JSON Schemas and documentation tables of the policy and inventory files, from the models.

The pydantic models in rollout/policy.py (`Policy`) and rollout/inventory.py
(``_InventoryFile``) are the single source: their ``Field(description=...)`` texts, types,
constraints and defaults become

- `json_schema` - a JSON Schema (draft 2020-12) of the file *as a user writes it*, shipped
  as schemas/policy.schema.json and schemas/inventory.schema.json and printed by
  ``rollout schema policy|inventory``, so that editors complete and check the files
  (``# yaml-language-server: $schema=...``);
- `field_tables` - the markdown field tables (field | type | default | meaning) of
  docs/policies.md and docs/inventory.md, placed between ``<!-- generated: KEY -->`` and
  ``<!-- end generated -->`` markers.

``python -m rollout.schema --write`` rewrites both (the docs' prose around the markers is
kept); ``--check`` exits 1 when they are stale. tests/test_schema_docs.py fails in the same
case.

Design:

- pydantic's validation-mode schema describes a ``BeforeValidator`` type by its inner type
  only: a duration is ``number``, although the file says ``5s``. Rather than change the
  models (``json_schema_input_type=`` on each validator), `_FileSchema`, a
  `GenerateJsonSchema`, looks up each validator *function* of the models in `_BEFORE`,
  `_AFTER` and `_PLAIN` and emits the form the file accepts: ``parse_duration`` -> a number
  of seconds or a string like ``"1h30m"``, ``parse_rate`` -> bytes per second or
  ``"50MiB/s"``, the ``prestage`` shorthand -> a mode name or the mapping, `Amount` -> a
  count or ``"25%"``, and so on. Validation is untouched. An unknown BeforeValidator is an
  error (a new one cannot silently yield a wrong schema); an unknown AfterValidator only
  narrows, so the schema stays right, merely looser. The same entries name each form in
  the docs' type column ("Duration", "Amount", ...) and format its defaults (``5m``).
- Bounds that pydantic cannot push into a wrapped type leak out as non-standard
  ``gt``/``ge``/``lt``/``le`` keys; they become ``exclusiveMinimum`` etc., and a
  positive duration's or rate's string form gets a pattern that needs a non-zero digit.
- Patterns use only syntax common to ECMA-262 (what editors run) and Python's ``re``
  (what the tests run), and start with ``^`` (JSON Schema patterns search). Each carries
  an ``errorMessage`` or ``patternErrorMessage`` in the loader's words: VS Code and
  yaml-language-server show it instead of "Incorrect type" or the raw pattern; other
  validators ignore these annotations.
- The schema checks every rule a JSON Schema can state: field names (extra fields are
  forbidden, as in the models), types, enums, bounds, formats of durations, amounts, rates,
  clock times, days, names, URLs, addresses. It cannot check rules across fields or
  outside the file: ``health.deadline > min_healthy_time``, unique gate and node names,
  ``failure_limit < count``, a gate on the canary when ``batches.canary`` is 0, an
  analysis without a condition, the condition language, time zone names, ``start != end``;
  nor that strict integer fields refuse ``8.0`` (JSON Schema's ``integer`` accepts it) or
  that a rate below one byte per second (``0.5B/s``) is 0. Those remain the loader's
  (``rollout plan`` / ``rollout run``) to report; tests/test_schema_docs.py pins them.
- `field_tables` walks the same models: one table per model (``policy.batches``), one per
  member of a discriminated union (``policy.gates.bake``), and for gates one table of the
  fields every gate shares (`_COMMON`), which must then have the same description in every
  member. A field without a description is an error.

The schemas' ``$id`` is a URN: the project publishes no URL; editors find the file by
path.
"""

from __future__ import annotations

import argparse
import enum
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import PydanticUndefined, core_schema

from rollout import inventory, policy, units
from rollout.gates.window import DAYS
from rollout.units import Amount

__all__ = [
    "KINDS",
    "Kind",
    "field_tables",
    "json_schema",
    "main",
    "render_doc",
    "schema_text",
]

Kind = Literal["policy", "inventory"]
KINDS: tuple[Kind, ...] = ("policy", "inventory")

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ROOT = Path(__file__).resolve().parent.parent
DOCS: dict[Kind, Path] = {
    "policy": ROOT / "docs/policies.md",
    "inventory": ROOT / "docs/inventory.md",
}
REGENERATE = "python -m rollout.schema --write"

_MODELS: dict[Kind, type[BaseModel]] = {
    "policy": policy.Policy,
    "inventory": inventory._InventoryFile,
}
_HEADER: dict[Kind, tuple[str, str]] = {
    "policy": (
        "rollout policy file",
        "How a rollout cuts the fleet into batches, checks health, waits on gates and reacts "
        "to failure (docs/policies.md). Every field is optional.",
    ),
    "inventory": (
        "rollout inventory file",
        "The fleet: every node the controller updates and how to reach its agent "
        "(docs/inventory.md).",
    ),
}


def schema_path(kind: Kind) -> Path:
    """Where the shipped schema of ``kind`` lives in the repository."""
    return ROOT / "schemas" / f"{kind}.schema.json"


# ---------------------------------------------------------------------------------------
# The file forms of the validated types
# ---------------------------------------------------------------------------------------

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = rf"^\s*(?:{_NUMBER}|(?:{_NUMBER}(?:ms|s|m|h))+)\s*$"
_NONZERO = r"(?=.*[1-9])"  # some digit is not 0, so the value is not 0
_POSITIVE_DURATION = f"^{_NONZERO}{_DURATION[1:]}"
_RATE = rf"^\s*{_NUMBER}\s*(?:[KMG]i?B|B)/s\s*$"
_POSITIVE_RATE = f"^{_NONZERO}{_RATE[1:]}"
_PERCENT = r"(?:0*[1-9]\d?(?:\.\d+)?|0*100(?:\.0+)?|0+\.\d*[1-9]\d*)\s*%"  # (0, 100]
_AMOUNT = rf"^\s*(?:\d+|{_PERCENT})\s*$"
_POSITIVE_AMOUNT = rf"^\s*(?:0*[1-9]\d*|{_PERCENT})\s*$"
_CLOCK = r"(?:[01]?\d|2[0-3]):[0-5]\d"
_PORT = r"(?=\d{1,5}$)0*(?:[1-9]\d{0,3}|[1-5]\d{4}|6[0-4]\d{3}|65[0-4]\d{2}|655[0-2]\d|6553[0-5])"
_HOST_PORT = rf"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):{_PORT}"


def _any_case(word: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" for c in word)


_DAY = "(?:" + "|".join(_any_case(d) for d in DAYS) + ")"
_DAY_ITEM = rf"\s*{_DAY}\s*(?:-\s*{_DAY}\s*)?"


# Editors (VS Code, yaml-language-server) show ``errorMessage`` / ``patternErrorMessage``
# instead of "Incorrect type" or the raw pattern; validators ignore them. A value of a form
# with a number and a string branch gets the same message whichever branch the editor picks.
_DURATION_MESSAGE = 'expected a duration: seconds (30, 1.5) or "500ms", "5s", "2m", "1h30m"'
_POSITIVE_DURATION_MESSAGE = _DURATION_MESSAGE.replace("a duration", "a duration > 0")
_AMOUNT_MESSAGE = 'expected a count (3) or a percentage of the fleet ("25%", at most 100%)'
_POSITIVE_AMOUNT_MESSAGE = _AMOUNT_MESSAGE.replace("a count (3)", "a count >= 1")
_RATE_MESSAGE = "expected bytes per second (4096) or a rate such as 50MiB/s, 10MB/s, 512KiB/s"


def _either(number: JsonSchemaValue, pattern: str, message: str) -> JsonSchemaValue:
    """A number or a string of ``pattern``, with one error message for both."""
    return {
        "anyOf": [
            {**number, "errorMessage": message},
            {"type": "string", "pattern": pattern, "errorMessage": message},
        ]
    }


def _string(pattern: str, message: str) -> JsonSchemaValue:
    return {"type": "string", "pattern": pattern, "patternErrorMessage": message}


def _duration(_: JsonSchemaValue) -> JsonSchemaValue:
    return _either({"type": "number", "minimum": 0}, _DURATION, _DURATION_MESSAGE)


def _amount(_: JsonSchemaValue) -> JsonSchemaValue:
    return _either({"type": "integer", "minimum": 0}, _AMOUNT, _AMOUNT_MESSAGE)


def _positive_amount(_: JsonSchemaValue) -> JsonSchemaValue:
    number = {"type": "integer", "minimum": 1}
    return _either(number, _POSITIVE_AMOUNT, _POSITIVE_AMOUNT_MESSAGE)


def _rate(inner: JsonSchemaValue) -> JsonSchemaValue:
    return _either(inner, _RATE, _RATE_MESSAGE)


def _prestage(inner: JsonSchemaValue) -> JsonSchemaValue:
    modes = list(typing.get_args(policy.PrestageMode))
    return {"anyOf": [{"type": "string", "enum": modes}, inner]}


def _gate_after(_: JsonSchemaValue) -> JsonSchemaValue:
    return {
        "anyOf": [
            {"type": "string", "enum": ["canary", "every"]},
            {"type": "integer", "minimum": 1},
        ]
    }


_CLOCK_MESSAGE = 'expected a time "HH:MM" (24-hour clock), in quotes'


def _clock(_: JsonSchemaValue) -> JsonSchemaValue:
    return _string(rf"^\s*{_CLOCK}\s*$", _CLOCK_MESSAGE)


def _clock_end(_: JsonSchemaValue) -> JsonSchemaValue:
    return _string(
        rf"^\s*(?:{_CLOCK}|24:00)\s*$", _CLOCK_MESSAGE.replace('"HH:MM"', '"HH:MM" or "24:00"')
    )


_DAYS_MESSAGE = "expected a day name like mon or a range like mon-fri"


def _days(_: JsonSchemaValue) -> JsonSchemaValue:
    return {
        "anyOf": [
            {"type": "array", "minItems": 1, "items": _string(f"^{_DAY_ITEM}$", _DAYS_MESSAGE)},
            _string(f"^{_DAY_ITEM}(?:,{_DAY_ITEM})*$", _DAYS_MESSAGE),
        ]
    }


def _labels(inner: JsonSchemaValue) -> JsonSchemaValue:
    return {**inner, "additionalProperties": {"type": ["string", "integer"]}}


def _pattern(regex: str, message: str) -> Callable[[JsonSchemaValue], JsonSchemaValue]:
    def narrow(inner: JsonSchemaValue) -> JsonSchemaValue:
        if inner.get("type") != "string" or "pattern" in inner:
            raise TypeError(f"cannot add a pattern to {inner}")
        return {**inner, **_string(regex, message)}

    return narrow


def _seconds(value: object) -> str:
    """A duration default as the docs write it: ``500ms``, ``2s``, ``5m``, ``1h30m``."""
    if not isinstance(value, int | float):
        raise TypeError(f"a duration default must be seconds, got {value!r}")
    if value == 0:
        return "0s"
    if value < 1:
        return f"{value * 1000:g}ms"
    if not float(value).is_integer():
        return f"{value:g}s"
    hours, rest = divmod(int(value), 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(hours, "h"), (minutes, "m"), (seconds, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n)


@dataclass(frozen=True)
class _Form:
    """What one validator function of the models means for the file.

    ``json`` turns pydantic's schema of the validated type (for a BeforeValidator: of its
    inner type) into the file's form; ``name`` is the docs' type column (``None``: the
    type's own name); ``constraint`` is added to the constraints in that column;
    ``default`` formats a default value of such a field.
    """

    json: Callable[[JsonSchemaValue], JsonSchemaValue] | None = None
    name: str | None = None
    constraint: str | None = None
    default: Callable[[object], str] | None = None


_MODES = " \\| ".join(f"`{m}`" for m in typing.get_args(policy.PrestageMode))

# BeforeValidators widen what the file may say: each one must be listed here.
_BEFORE: dict[Callable[..., Any], _Form] = {
    units.parse_duration: _Form(_duration, "Duration", default=_seconds),
    units.parse_rate: _Form(_rate, "rate (`50MiB/s`, `10MB/s`, `512KiB/s`, or bytes per second)"),
    policy._prestage_shorthand: _Form(_prestage, f"{_MODES}, or a mapping"),
    policy._gate_after: _Form(_gate_after, "`canary` \\| batch number >= 1 \\| `every`"),
    policy._clock_value: _Form(_clock, '`"HH:MM"` (quoted)'),
    policy._clock_end_value: _Form(_clock_end, '`"HH:MM"` or `"24:00"` (quoted)'),
    policy._days_value: _Form(_days, "list of `mon` ... `sun` and ranges like `mon-fri`"),
    inventory._labels_as_strings: _Form(_labels, "mapping of string to string"),
}
# AfterValidators narrow it; one missing here leaves the schema looser, never wrong.
_AFTER: dict[Callable[..., Any], _Form] = {
    units._positive: _Form(_positive_amount, constraint="> 0"),
    policy._abs_path: _Form(_pattern("^/", 'must start with "/"'), "string starting with `/`"),
    policy._gate_name: _Form(
        _pattern(
            f"^{policy._GATE_NAME_RE.pattern}$",
            'lowercase letters, digits and "-" (not at either end), at most 63 characters',
        ),
        "string",
    ),
    policy._http_url: _Form(
        _pattern(f"^{policy._URL_RE.pattern}$", "expected an http:// or https:// URL"),
        "URL (`http://` or `https://`)",
    ),
    policy._condition: _Form(name="condition"),
    policy._timezone_value: _Form(name="IANA time zone"),
    inventory._check_id: _Form(
        _pattern(
            f"^{inventory._ID_RE.pattern}$", 'may only contain letters, digits, ".", "_" and "-"'
        ),
        "string of `A-Z a-z 0-9 . _ -`",
    ),
    inventory._check_address: _Form(
        _pattern(f"{_HOST_PORT}$", 'expected host:port like "127.0.0.2:7000", port 1-65535'),
        "`host:port`",
    ),
}
# Plain validators replace pydantic's validation (and Amount its JSON Schema) entirely.
_PLAIN: dict[Callable[..., Any], _Form] = {Amount.parse: _Form(_amount, "Amount")}

_BOUNDS = {"gt": "exclusiveMinimum", "ge": "minimum", "lt": "exclusiveMaximum", "le": "maximum"}
_STRICTER_PATTERN = {_DURATION: _POSITIVE_DURATION, _RATE: _POSITIVE_RATE}
_STRICTER_MESSAGE = {_DURATION_MESSAGE: _POSITIVE_DURATION_MESSAGE}


def _function(schema: Mapping[str, Any]) -> Any:
    return schema["function"]["function"]


def _apply_bounds(js: JsonSchemaValue, bounds: Mapping[str, Any]) -> JsonSchemaValue:
    """Turn pydantic's leaked ``gt``/``ge``/... keys into JSON Schema on every branch."""
    branches = js["anyOf"] if "anyOf" in js else [js]
    for branch in branches:
        kind = branch.get("type")
        if bounds == {"gt": 0} and branch.get("errorMessage") in _STRICTER_MESSAGE:
            branch["errorMessage"] = _STRICTER_MESSAGE[branch["errorMessage"]]
        if kind in ("number", "integer"):
            for key, value in bounds.items():
                branch[_BOUNDS[key]] = value
            if (
                "exclusiveMinimum" in branch
                and branch.get("minimum", -1) <= branch["exclusiveMinimum"]
            ):
                branch.pop("minimum", None)
        elif (
            kind == "string" and bounds == {"gt": 0} and branch.get("pattern") in _STRICTER_PATTERN
        ):
            branch["pattern"] = _STRICTER_PATTERN[branch["pattern"]]
        elif kind == "string" and bounds == {"ge": 0} and branch.get("pattern") == _DURATION:
            pass  # a duration string is never negative
        elif kind != "null":
            raise TypeError(f"cannot express bounds {dict(bounds)} on {branch}")
    return js


class _FileSchema(GenerateJsonSchema):
    """pydantic's validation-mode JSON Schema, with each validator's file form."""

    def generate_inner(self, schema: Any) -> JsonSchemaValue:
        if schema.get("type") == "function-plain":
            form = _PLAIN.get(_function(schema))
            if form is None or form.json is None:
                raise TypeError(f"no file form for the plain validator {_function(schema)}")
            return form.json({})
        js = super().generate_inner(schema)
        bounds = {key: js.pop(key) for key in list(js) if key in _BOUNDS}
        return _apply_bounds(js, bounds) if bounds else js

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        form = _BEFORE.get(_function(schema))
        if form is None or form.json is None:
            raise TypeError(
                f"no file form for the BeforeValidator {_function(schema)}: add one to "
                "rollout.schema._BEFORE"
            )
        return form.json(self.generate_inner(schema["schema"]))

    def function_after_schema(
        self, schema: core_schema.AfterValidatorFunctionSchema
    ) -> JsonSchemaValue:
        inner = self.generate_inner(schema["schema"])
        form = _AFTER.get(_function(schema))
        return form.json(inner) if form is not None and form.json is not None else inner

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        js = super().model_schema(schema)
        if isinstance(js.get("title"), str):
            js["title"] = js["title"].lstrip("_")
        return js

    def normalize_name(self, name: str) -> str:
        return super().normalize_name(name).lstrip("_")


def json_schema(kind: Kind) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy or an inventory file as a user writes it."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    generated = _MODELS[kind].model_json_schema(schema_generator=_FileSchema, mode="validation")
    title, description = _HEADER[kind]
    generated.pop("title", None)
    generated.pop("description", None)
    return {
        "$schema": DIALECT,
        "$id": f"urn:rollout:schema:{kind}",
        "$comment": f"Generated from the models in rollout/{kind}.py by: {REGENERATE}",
        "title": title,
        "description": description,
        **generated,
    }


def schema_text(kind: Kind) -> str:
    """`json_schema` as the shipped file holds it (indented JSON, one final newline)."""
    return json.dumps(json_schema(kind), indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------
# Field tables
# ---------------------------------------------------------------------------------------

# Fields documented once for all members of a union (docs/policies.md "Fields every gate
# has") instead of in each member's table.
_COMMON: dict[str, tuple[str, ...]] = {"policy.gates": ("name", "kind", "after", "before")}
# What a list of these models is called in the type column.
_NOUNS: dict[type[BaseModel], str] = {
    policy.HttpCheck: "checks",
    policy.BakeGate: "gates",
    policy.Notify: "webhooks",
    inventory._NodeEntry: "nodes",
}
_FILE_FIELDS = ("token_file", "ca_file")  # inventory paths: "path", not "string"
# Defaults that the loader fills in from elsewhere (the model's own default is null).
_INHERITED: dict[tuple[type[BaseModel], str], str] = {
    (inventory._NodeEntry, "token_file"): "top-level `token_file`",
    (inventory._NodeEntry, "ca_file"): "top-level `ca_file`",
}


def _flatten(tp: Any, metadata: Sequence[Any]) -> tuple[Any, list[Any]]:
    """Strip Annotated[...] off ``tp``, gathering its metadata (FieldInfo's too)."""
    found: list[Any] = []

    def gather(items: Sequence[Any]) -> None:
        for item in items:
            if isinstance(item, FieldInfo):
                gather(item.metadata)
            else:
                found.append(item)

    gather(metadata)
    while typing.get_origin(tp) is typing.Annotated:
        tp, *extra = typing.get_args(tp)
        gather(extra)
    return tp, found


def _union_args(tp: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _models(tp: Any) -> list[type[BaseModel]]:
    """The models a field holds: itself, its list's items, or a union's members."""
    tp, _ = _flatten(tp, ())
    if typing.get_origin(tp) in (tuple, list):
        tp, _ = _flatten(typing.get_args(tp)[0], ())
    args = _union_args(tp) or (tp,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _forms(metadata: Sequence[Any]) -> list[_Form]:
    forms = []
    for item in metadata:
        if isinstance(item, BeforeValidator) and item.func in _BEFORE:
            forms.append(_BEFORE[item.func])
        elif isinstance(item, AfterValidator) and item.func in _AFTER:
            forms.append(_AFTER[item.func])
    return forms


def _constraints(metadata: Sequence[Any], forms: Sequence[_Form]) -> list[str]:
    bounds: dict[str, Any] = {}
    out: list[str] = []
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            bounds["gt"] = item.gt
        elif isinstance(item, annotated_types.Ge):
            bounds["ge"] = item.ge
        elif isinstance(item, annotated_types.Lt):
            bounds["lt"] = item.lt
        elif isinstance(item, annotated_types.Le):
            bounds["le"] = item.le
        elif isinstance(item, annotated_types.MinLen):
            out.append("not empty" if item.min_length == 1 else f"at least {item.min_length}")
    if "ge" in bounds and "le" in bounds:
        out.insert(0, f"{bounds.pop('ge')}-{bounds.pop('le')}")
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    out[:0] = [f"{symbols[key]} {value}" for key, value in bounds.items()]
    out += [f.constraint for f in forms if f.constraint]
    return out


def _plural(text: str) -> str:
    return text if text.endswith("s") else f"{text}s"


def _type_text(annotation: Any, metadata: Sequence[Any], *, path_like: bool = False) -> str:
    """The docs' type column for a field: its form or type, its constraints, "or null"."""
    tp, meta = _flatten(annotation, metadata)
    args = _union_args(tp)
    if args is not None and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner = _type_text(rest[0], meta, path_like=path_like) if len(rest) == 1 else "?"
        return f"{inner}, or null" if "," in inner else f"{inner} or null"
    forms = _forms(meta)
    names = [f.name for f in forms if f.name]
    name = names[0] if names else _base_name(tp, path_like=path_like)
    constraints = _constraints(meta, forms)
    if tp is str and name != "string":  # a path or a format is never empty anyway
        constraints = [c for c in constraints if c != "not empty"]
    return ", ".join([name, *constraints])


def _base_name(tp: Any, *, path_like: bool = False) -> str:
    tp, _ = _flatten(tp, ())
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        item, item_meta = _flatten(typing.get_args(tp)[0], ())
        models = _models(item)
        if models:
            noun = _NOUNS.get(models[0])
            if noun is None:
                fields = list(models[0].model_fields)
                noun = "`{" + ", ".join(fields) + "}`" if len(fields) <= 3 else "mappings"
            return f"list of {noun}"
        if typing.get_origin(item) is Literal:
            return "list of " + ", ".join(f"`{v}`" for v in typing.get_args(item))
        return "list of " + _plural(_type_text(item, item_meta))
    if origin is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {_base_name(key)} to {_base_name(value)}"
    if tp is Amount:
        return "Amount"
    if tp is str:
        return "path" if path_like else "string"
    names = {int: "integer", float: "number", bool: "boolean"}
    if tp in names:
        return names[tp]
    raise TypeError(f"no name for the type {tp!r} in the docs")


def _code(text: str) -> str:
    return f"`{text}`"


def _yaml_inline(value: object) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _plain(value: object) -> object:
    """A default as the file would write it (models, enums and amounts in YAML form)."""
    if isinstance(value, BaseModel):
        tags = {  # a union member's tag is written even where it is the default
            name
            for name, field in type(value).model_fields.items()
            if typing.get_origin(field.annotation) is Literal
            and len(typing.get_args(field.annotation)) == 1
        }
        return {
            name: _plain(getattr(value, name))
            for name in type(value).model_fields
            if name in tags or name in value.model_dump(exclude_defaults=True)
        }
    if isinstance(value, Amount):
        return value.to_yaml()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    tp, meta = _flatten(field.annotation, field.metadata)
    args = _union_args(tp)
    if args is not None and type(None) in args and value is not None:
        tp, meta = _flatten(next(a for a in args if a is not type(None)), meta)
    for form in _forms(meta):
        if form.default is not None and value is not None:
            return _code(form.default(value))
    if isinstance(value, Amount) and value.percent:
        return _code(f'"{value.to_yaml()}"')
    if isinstance(value, tuple | list) and value and typing.get_origin(tp) in (tuple, list):
        item, _ = _flatten(typing.get_args(tp)[0], ())
        if typing.get_origin(item) is Literal and set(value) == set(typing.get_args(item)):
            return "all"
    if value is PydanticUndefined:  # pragma: no cover - is_required() said no
        raise TypeError("a default without a value")
    return _code(_yaml_inline(_plain(value)))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("\\\\|", "\\|")


@dataclass(frozen=True)
class _Row:
    name: str
    type: str
    default: str
    meaning: str

    def markdown(self) -> str:
        return f"| `{self.name}` | {self.type} | {self.default} | {self.meaning} |"


def _row(model: type[BaseModel], name: str, field: FieldInfo) -> _Row:
    if not field.description:
        raise ValueError(f"{model.__name__}.{name} has no description")
    return _Row(
        name=name,
        type=_type_text(field.annotation, field.metadata, path_like=name in _FILE_FIELDS),
        default=_INHERITED.get((model, name)) or _cell(_default_text(field)),
        meaning=_cell(field.description),
    )


def _table(rows: Sequence[_Row]) -> str:
    lines = ["| field | type | default | meaning |", "|---|---|---|---|"]
    return "\n".join(lines + [r.markdown() for r in rows]) + "\n"


def _discriminator(tp: Any) -> str | None:
    """The tag field of a discriminated union (or of a list of one), else None."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp, *extra = typing.get_args(tp)
            for item in extra:
                if isinstance(item, FieldInfo) and isinstance(item.discriminator, str):
                    return item.discriminator
        elif origin in (tuple, list):
            tp = typing.get_args(tp)[0]
        else:
            return None


def _tag(model: type[BaseModel], discriminator: str) -> str:
    (tag,) = typing.get_args(model.model_fields[discriminator].annotation)
    return str(tag)


def _common_rows(key: str, members: Sequence[type[BaseModel]], disc: str) -> list[_Row]:
    rows = []
    for name in _COMMON[key]:
        having = [m for m in members if name in m.model_fields]
        first = having[0].model_fields[name]
        for other in having[1:]:
            field = other.model_fields[name]
            same_type = name == disc or (repr(field.annotation), repr(field.metadata)) == (
                repr(first.annotation),
                repr(first.metadata),
            )
            if field.description != first.description or not same_type:
                raise ValueError(
                    f"{key}: {name} differs between {having[0].__name__} and {other.__name__}"
                )
        row = _row(having[0], name, first)
        if name == disc:
            tags = " \\| ".join(f"`{_tag(m, disc)}`" for m in members)
            row = _Row(name, tags, "required", row.meaning)
        if len(having) < len(members):
            only = ", ".join(f"`{_tag(m, disc)}`" for m in having)
            row = _Row(row.name, row.type, f"{row.default}; only for {only}", row.meaning)
        rows.append(row)
    return rows


def _sections(
    key: str, model: type[BaseModel], skip: Sequence[str] = ()
) -> Iterator[tuple[str, list[_Row]]]:
    rows = [_row(model, n, f) for n, f in model.model_fields.items() if n not in skip]
    if rows:
        yield key, rows
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        members = _models(field.annotation)
        sub = f"{key}.{name}"
        disc = _discriminator(field.annotation)
        if disc is None:
            for member in members:
                yield from _sections(sub, member)
            continue
        common = _COMMON.get(sub, ())
        if common:
            yield sub, _common_rows(sub, members, disc)
        for member in members:
            yield from _sections(f"{sub}.{_tag(member, disc)}", member, (disc, *common))


def field_tables(kind: Kind) -> dict[str, str]:
    """The markdown field tables of a file, by section: ``policy`` (the top level),
    ``policy.batches``, ``policy.gates`` (fields every gate has), ``policy.gates.bake`` ...
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return {key: _table(rows) for key, rows in _sections(kind, _MODELS[kind])}


# ---------------------------------------------------------------------------------------
# The docs
# ---------------------------------------------------------------------------------------

_GENERATED_RE = re.compile(
    r"(?P<start><!-- generated: (?P<key>[\w.]+) -->\n)(?P<body>.*?)(?P<end><!-- end generated -->)",
    re.DOTALL,
)


def render_doc(text: str, tables: Mapping[str, str]) -> str:
    """``text`` with every generated section replaced by its table from ``tables``.

    ValueError when a marker names an unknown table, or a table has no marker (each one
    must appear exactly once).
    """
    seen: list[str] = []

    def replace(m: re.Match[str]) -> str:
        key = m.group("key")
        if key not in tables:
            raise ValueError(
                f"<!-- generated: {key} -->: no such table (known: {', '.join(tables)})"
            )
        seen.append(key)
        return f"{m.group('start')}{tables[key]}{m.group('end')}"

    out = _GENERATED_RE.sub(replace, text)
    missing = [k for k in tables if k not in seen]
    twice = sorted({k for k in seen if seen.count(k) > 1})
    if missing or twice:
        raise ValueError(
            f"generated sections: missing {', '.join(missing) or '-'}; "
            f"more than once {', '.join(twice) or '-'}"
        )
    return out


def generated_sections(text: str) -> dict[str, str]:
    """The current bodies of the generated sections of a doc, by key."""
    return {m.group("key"): m.group("body") for m in _GENERATED_RE.finditer(text)}


def _outputs() -> dict[Path, str]:
    out: dict[Path, str] = {}
    for kind in KINDS:
        out[schema_path(kind)] = schema_text(kind)
        doc = DOCS[kind]
        out[doc] = render_doc(doc.read_text(encoding="utf-8"), field_tables(kind))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rollout.schema --write | --check``."""
    parser = argparse.ArgumentParser(
        prog="python -m rollout.schema",
        description="Regenerate (or check) schemas/*.schema.json and the field tables of "
        "docs/policies.md and docs/inventory.md from the models' field descriptions.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the files that differ")
    mode.add_argument("--check", action="store_true", help="exit 1 if any file differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in _outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        verb = "wrote" if args.write else "stale"
        print(f"{verb}: {path.relative_to(ROOT)}")
    if args.check and stale:
        print(f"regenerate with: {REGENERATE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
