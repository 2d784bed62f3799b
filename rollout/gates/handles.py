"""Pre-signed signal URLs for wait gates, as Heat's wait-condition handles are.

A Heat or CloudFormation client (``cfn-signal``, a ``curl`` in a test job) cannot send our
bearer token: ``cfn-signal URL`` sends ``curl -X PUT`` with the CloudFormation body and no
Authorization header. So each ``wait`` gate of each rollout has its own URL that carries
its own secret, and that URL is the credential::

    /v1/rollouts/{rollout id}/gates/{gate}/signal/{secret}

The secret is HMAC-SHA256 over ``rollout id`` and ``gate`` under the controller's signal
key (32 random bytes), base64url without padding (43 characters). Properties:

- unguessable without the key, and different for every rollout and gate: knowing one
  URL says nothing about another (nor about the key, nor the API token);
- derived, not stored: the journal holds no secret (it is exported by the events API,
  printed by ``rollout history``, readable by whoever may read the state file), yet a
  restarted or resumed controller gives the same URL again, because it reads the same key;
- checked in constant time (`secret_matches`), and the expected value is computed whether
  or not the rollout exists, so the answer to a wrong URL says nothing about which part
  was wrong.

The key lives beside the state file, in ``<state file>.signal-key`` (64 hex digits,
mode 0600, created on first use with O_EXCL; a key file that others may read, or that is
malformed, is refused naming it). A state file of ``:memory:`` gets a key in memory.
Deleting the key file revokes every signal URL of that state file; the next use makes a
new key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
import threading
from pathlib import Path

from rollout.errors import InputError

__all__ = [
    "KEY_SUFFIX",
    "SignalKey",
    "gate_secret",
    "secret_matches",
    "signal_path",
]

KEY_SUFFIX = ".signal-key"
KEY_BYTES = 32
_CONTEXT = b"rollout wait-gate signal v1"


def gate_secret(key: bytes, rollout_id: str, gate: str) -> str:
    """The secret of one gate's signal URL (pure).

    >>> k = bytes(32)
    >>> s = gate_secret(k, "r1", "tests")
    >>> len(s), s == gate_secret(k, "r1", "tests"), s == gate_secret(k, "r2", "tests")
    (43, True, False)
    >>> gate_secret(k, "r1", "tests") == gate_secret(k, "r1t", "ests")  # fields are framed
    False
    """
    message = b"\n".join((_CONTEXT, rollout_id.encode(), gate.encode()))
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def secret_matches(key: bytes, rollout_id: str, gate: str, given: str) -> bool:
    """Whether ``given`` is the gate's secret, compared in constant time (pure).

    >>> k = bytes(32)
    >>> good = gate_secret(k, "r1", "tests")
    >>> [secret_matches(k, "r1", "tests", s) for s in (good, good[:-1], "", "é" * 43)]
    [True, False, False, False]
    """
    expected = gate_secret(key, rollout_id, gate).encode()
    return hmac.compare_digest(expected, given.encode("utf-8", "replace"))


def signal_path(rollout_id: str, gate: str, secret: str) -> str:
    """The path of a gate's signal URL (the origin is the controller's API address).

    >>> signal_path("r1", "tests", "abc")
    '/v1/rollouts/r1/gates/tests/signal/abc'
    """
    return f"/v1/rollouts/{rollout_id}/gates/{gate}/signal/{secret}"


class SignalKey:
    """The controller's signal key, loaded (or made) on first use and then kept.

    ``SignalKey.beside(state_path)`` keeps it in ``<state_path>.signal-key``;
    ``SignalKey(None)`` keeps a random one in memory (a ``:memory:`` store, tests).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._key: bytes | None = None
        self._mutex = threading.Lock()

    @classmethod
    def beside(cls, state_path: str) -> SignalKey:
        if state_path == ":memory:":
            return cls(None)
        return cls(Path(state_path + KEY_SUFFIX))

    def key(self) -> bytes:
        """The key; InputError naming the file when it cannot be read, made or trusted."""
        with self._mutex:
            if self._key is None:
                self._key = secrets.token_bytes(KEY_BYTES) if self.path is None else self._load()
            return self._key

    def secret(self, rollout_id: str, gate: str) -> str:
        return gate_secret(self.key(), rollout_id, gate)

    def matches(self, rollout_id: str, gate: str, given: str) -> bool:
        return secret_matches(self.key(), rollout_id, gate, given)

    def _load(self) -> bytes:
        assert self.path is not None
        path = self.path
        try:
            return _read_key(path)
        except FileNotFoundError:
            pass
        # Write a temporary file, then link it into place: a concurrent reader never sees
        # a half-written key, and of two controllers creating it at once one wins.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(KEY_BYTES) + "\n")
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        except OSError as exc:
            raise InputError(f"{path}: cannot create the signal key: {exc.strerror}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise InputError(f"{path}: cannot read the signal key: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"{path}: the signal key is accessible to others (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 {path}, or delete it to revoke every signal URL and make a new key"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise InputError(
            f"{path}: not a signal key (expected {2 * KEY_BYTES} hex digits); delete it to "
            "make a new one (this revokes every signal URL of the state file)"
        )
    return key
