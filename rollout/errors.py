"""Errors that cross layers.

`InputError` is the one a user fixes by changing what they gave us (a file, a flag); the CLI
prints its message on one line and exits 2. Its message names where (file, field) and what.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad input from the user: exit code 2, message says what, where and how to fix."""


class ImageError(InputError):
    """An image file (or a directory to pack) is malformed or unsafe."""
