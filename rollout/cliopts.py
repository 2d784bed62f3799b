"""Click options shared by several commands, declared once.

`registry_options` adds `--authfile`, `--registry-ca` and `--registry-plain-http` (how the
controller and its nodes reach an image registry in pull mode) and passes them on as one
`pull` argument, a `rollout.pull.PullAccess` with absolute paths (a service may change
directory; the journal keeps the paths).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import click

from rollout.pull import PullAccess


def registry_options(f: Callable[..., Any]) -> Callable[..., Any]:
    @click.option(
        "--authfile",
        type=click.Path(dir_okay=False),
        help="Registry credentials (containers auth.json / docker config.json format) "
        "[default: $REGISTRY_AUTH_FILE, then the usual places].",
    )
    @click.option(
        "--registry-ca",
        type=click.Path(dir_okay=False),
        help="PEM CA the registry's (and its mirrors') certificates are verified against.",
    )
    @click.option(
        "--registry-plain-http",
        is_flag=True,
        help="Reach the registry over plain HTTP (a lab registry without TLS).",
    )
    @functools.wraps(f)
    def wrapper(
        *args: Any,
        authfile: str | None,
        registry_ca: str | None,
        registry_plain_http: bool,
        **kwargs: Any,
    ) -> Any:
        pull = PullAccess(
            authfile=os.path.abspath(authfile) if authfile else None,
            ca_file=os.path.abspath(registry_ca) if registry_ca else None,
            plain_http=registry_plain_http,
        )
        return f(*args, pull=pull, **kwargs)

    return wrapper


def trusted_key_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--trusted-key` (repeatable, passed on as `trusted_keys`); `help` says what it
    guards in this command."""
    return click.option(
        "--trusted-key",
        "trusted_keys",
        multiple=True,
        type=click.Path(dir_okay=False),
        help=f"ed25519 public key (PEM): {help}",
    )
