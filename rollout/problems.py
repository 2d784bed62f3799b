"""pydantic's ValidationError as one line a user can act on: ``<file>: <field.path>: <problem>``.

For example ``policies/x.yaml: batches.size: expected a count or a percentage like "25%",
got "lots"``. `validation_message` takes the first error, walks the model tree to write
the user's path (``checks[0].port``, without the discriminator tags pydantic inserts),
and words the problem in the file's terms. A model-level validator that blames one field
raises `FieldProblem`, so the message points at that field. Policy and inventory files
report errors alike through this module.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from rollout.units import show

# A discriminated union's tag key -> (what a tag names, the allowed tags), for messages.
Tags = Mapping[str, tuple[str, Sequence[str]]]


class FieldProblem(ValueError):
    """A ValueError raised by a model-level validator about one of the model's fields.

    pydantic places model-level errors at the model itself; `validation_message` appends
    ``field`` to the location so the message points at the field the user must change.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] wrappers down to the interesting type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
            else:
                return tp
        else:
            return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[str, Any]:
    """Human path for a pydantic ``loc`` and the type found at its parent.

    Discriminator tags that pydantic inserts into the location (``checks.0.http.port``)
    are dropped from the path (``checks[0].port``).
    """
    path = ""
    tp: Any = root
    parent: Any = None
    for part in loc:
        tp = _unwrap(tp)
        parent = tp
        if isinstance(part, int) and not _is_model(tp):
            path += f"[{part}]"
            args = typing.get_args(tp)
            tp = args[0] if args else None
            continue
        if typing.get_origin(tp) in (Union, types.UnionType):
            for member in typing.get_args(tp):
                field = (
                    (member.model_fields.get("type") or member.model_fields.get("kind"))
                    if _is_model(member)
                    else None
                )
                if field is not None and part in typing.get_args(field.annotation):
                    tp = member
                    break
            else:
                tp = None
            continue  # a tag: not part of the user's path
        if typing.get_origin(tp) in (dict, Mapping) or tp is dict:
            path += f".{part}" if path else str(part)
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else None
            continue
        path += f".{part}" if path else str(part)
        if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            tp = None
    return path, _unwrap(parent) if parent is not None else None


def _problem(err: Mapping[str, Any], parent: Any, tags: Tags) -> tuple[str, str]:
    """(extra path, problem) for one pydantic error dict."""
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    got = err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), FieldProblem):
        exc: FieldProblem = ctx["error"]
        return exc.field, str(exc)
    if kind in ("value_error", "assertion_error"):
        return "", str(ctx.get("error", err["msg"]))
    if kind == "extra_forbidden":
        known = ", ".join(parent.model_fields) if _is_model(parent) else ""
        return "", f"unknown field (known: {known})" if known else "unknown field"
    if kind == "missing":
        return "", "required field missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = str(ctx.get("discriminator", "")).strip("'")
        what, allowed = tags.get(key, (key, ()))
        known = f" (allowed: {', '.join(allowed)})" if allowed else ""
        if kind == "union_tag_not_found":
            return "", f'missing "{key}"{known}'
        return "", f"unknown {what} {show(ctx.get('tag'))}{known}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "", f"expected a mapping, got {show(got)}"
    if kind in ("list_type", "tuple_type"):
        return "", f"expected a list, got {show(got)}"
    if kind == "too_short":
        return "", "must not be empty"
    if kind in ("string_type", "str_type"):
        return "", f"expected a string, got {show(got)}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "", f"expected a whole number, got {show(got)}"
    if kind in ("float_type", "float_parsing", "bool_type", "bool_parsing"):
        return "", f"{err['msg'].lower()}, got {show(got)}"
    if kind in ("literal_error", "enum"):
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return "", f"expected one of: {', '.join(allowed)}; got {show(got)}"
    if kind == "invalid_key":
        return "", f"keys must be strings, got {show(got)}"
    if kind == "string_too_short":
        return "", "must not be empty"
    if kind == "string_pattern_mismatch":
        return "", f"{show(got)} does not match {ctx.get('pattern')}"
    comparisons = {
        "greater_than": ("gt", "greater than"),
        "greater_than_equal": ("ge", "at least"),
        "less_than": ("lt", "less than"),
        "less_than_equal": ("le", "at most"),
    }
    if kind in comparisons:
        key, words = comparisons[kind]
        return "", f"must be {words} {ctx.get(key)}, got {show(got)}"
    return "", f"{err['msg']}, got {show(got)}"


def validation_message(
    exc: ValidationError, root: type[BaseModel], source: str, tags: Tags | None = None
) -> str:
    """The first error of ``exc`` as one line: ``<source>: <field.path>: <problem>``.

    ``tags`` words the errors of discriminated unions (an unknown gate kind)."""
    err = exc.errors(include_url=False)[0]
    loc: tuple[int | str, ...] = tuple(err["loc"])
    path, parent = _walk(root, loc)
    extra, problem = _problem(err, parent, tags or {})
    if extra:
        path = f"{path}.{extra}" if path else extra
    problem = " ".join(problem.split())  # never more than one line
    return f"{source}: {path}: {problem}" if path else f"{source}: {problem}"
