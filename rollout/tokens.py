"""Bearer tokens read from files: the one reader every part uses.

A token file holds one bearer token; surrounding whitespace (a trailing newline) is not
part of it. An unreadable or empty file is an InputError (exit 2) that says which option
or node it belongs to (`what`), which file, and why; the token itself never appears in
a message.
"""

from __future__ import annotations

import os
from pathlib import Path

from rollout.errors import InputError


def read_token(path: str | os.PathLike[str], what: str) -> str:
    """The token in `path`; InputError "<what>: cannot read <path>: <why>" or "... is empty".

    >>> read_token("/nonexistent", "--token-file")
    Traceback (most recent call last):
    rollout.errors.InputError: --token-file: cannot read /nonexistent: No such file or directory
    """
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise InputError(f"{what}: cannot read {os.fspath(path)}: {exc.strerror}") from exc
    if not token:
        raise InputError(f"{what}: {os.fspath(path)} is empty; put the bearer token in it")
    return token
