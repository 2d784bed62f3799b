"""The Driver protocol: the engine's only way to touch a node.

Errors split in two, because they are handled differently:
- `TransportError`: the node could not be reached or answered garbage. Worth retrying
  (tenacity, with explicit stop and wait), and expected while a node reboots.
- `Refused`: the node answered and said no (digest mismatch, nothing staged, busy, ...).
  A verdict, never retried.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from rollout.model import ActivationMode, Image, Node, NodeStatus


class DriverError(Exception):
    """Base of errors raised by drivers."""


class TransportError(DriverError):
    """The node did not answer usefully (connection refused, timeout, 5xx)."""


class NotSent(TransportError):
    """The request never left: no connection to the node could be made. Unlike any other
    TransportError, it proves the node did not get it, so even an activation may be sent
    again."""


class Refused(DriverError):
    """The node answered and refused; `code` is its machine-readable error code."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 0,
        holder: str | None = None,
        expires_in: float = 0.0,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.holder = holder  # for code "leased": the rollout holding the node
        self.expires_in = expires_in


class Driver(Protocol):
    async def status(self, node: Node) -> NodeStatus: ...

    async def watch(self, node: Node, seen: NodeStatus, wait: float) -> NodeStatus | None:
        """The node's status as soon as it differs from `seen` (read by `status` or
        `watch`), or `seen` again after `wait` seconds; None at once when this node or
        driver cannot wait for a change, and the caller polls instead."""
        ...

    async def stage(
        self, node: Node, image: Image, on_bytes: Callable[[int], None] | None = None
    ) -> bool:
        """Write `image` into the node's inactive slot; True if bytes were written."""
        ...

    async def discard(self, node: Node, digest: str) -> bool:
        """Drop `digest` if it is staged (or being written) and not booted; True if it was."""
        ...

    async def activate(self, node: Node, mode: ActivationMode) -> None: ...

    async def commit(self, node: Node) -> NodeStatus: ...

    async def rollback(self, node: Node, mode: ActivationMode) -> None: ...

    async def close(self) -> None: ...
