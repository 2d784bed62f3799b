"""Reading one YAML file (policy or inventory) with errors a user can act on.

`read_yaml` returns the parsed document or raises one InputError line naming the file,
and for syntax errors the line and column. A key given twice in one mapping is an error
(plain YAML silently keeps the last one, which hides typos in long inventories).
"""

from __future__ import annotations

import os
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
