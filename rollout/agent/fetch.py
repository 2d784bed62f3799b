"""Pull-mode staging on the agent: the request, its progress, and the byte stream.

In pull mode the controller sends no image bytes. It posts `POST /v1/fetch` with what to
fetch (a registry blob URL or an https URL, the digest, the size, the signature) and, when
the store needs them, credentials and a CA. The agent answers 202 at once and streams the
blob into the inactive slot in the background, through the same one-pass writer as a
pushed image (`Backend.write_slot`: hashed while written, the digest checked before the
slot is claimed as staged). A broken connection resumes with an HTTP Range request
(`rollout.oci.RegistryClient.fetch`). Progress is in `/v1/status` under `fetch`, which the
controller polls.

Secrets: the password lives in a pydantic `SecretStr` and the request's repr never shows
it; the agent logs the URL and the digest, never the credentials, and keeps nothing of
them on disk.

`RateLimit` paces a stream to a byte rate (a per-node bandwidth cap set by the policy's
`prestage.bandwidth`), so a site's uplink is not filled by one node.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from rollout.agent.state import AgentError

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


class FetchAuth(BaseModel):
    """Basic credentials for the image store (never logged, never persisted)."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=256)
    password: SecretStr = Field(max_length=4096)


class FetchRequest(BaseModel):
    """The body of `POST /v1/fetch`."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(pattern=r"^https?://[^\s/]+/\S*$", max_length=4096)
    digest: str = Field(pattern=DIGEST_PATTERN)
    size: int = Field(gt=0, le=1 << 44)
    signature: str | None = Field(default=None, max_length=65536)
    auth: FetchAuth | None = None
    ca: str | None = Field(default=None, max_length=1 << 20)  # PEM of the store's CA
    rate_limit: int | None = Field(default=None, gt=0)  # bytes per second

    @classmethod
    def parse(cls, body: dict[str, Any]) -> FetchRequest:
        """Validate a request body; AgentError bad_request naming the first bad field."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "body"
            raise AgentError("bad_request", f"{where}: {err['msg']}", field=where) from None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """TLS verification for the store: against `ca` when given, else the system CAs."""
        if self.ca is None:
            return True
        try:
            return ssl.create_default_context(cadata=self.ca)
        except (ssl.SSLError, ValueError, TypeError) as exc:  # TypeError: not ASCII
            raise AgentError(
                "bad_request", f"ca: not a PEM certificate: {exc}", field="ca"
            ) from None


FetchState = Literal["fetching", "staged", "failed"]


@dataclass
class FetchProgress:
    """One fetch, as `/v1/status` shows it (the last one stays until the next starts)."""

    digest: str
    size: int
    url: str
    state: FetchState = "fetching"
    bytes: int = 0
    resumes: int = 0
    error: dict[str, str] | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @classmethod
    def restore(cls, raw: dict[str, Any]) -> FetchProgress | None:
        """From `describe()`'s output saved by a previous process; None if it is not one."""
        try:
            state: FetchState = "staged" if raw["state"] == "staged" else "failed"
            error = raw.get("error")
            return cls(
                digest=str(raw["digest"]),
                size=int(raw["size"]),
                url=str(raw["url"]),
                state=state,
                bytes=int(raw["bytes"]),
                resumes=int(raw["resumes"]),
                error=dict(error) if isinstance(error, dict) else None,
                started=0.0,
                finished=float(raw["seconds"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "url": self.url,
            "state": self.state,
            "bytes": self.bytes,
            "resumes": self.resumes,
            "error": self.error,
            "seconds": round(
                (self.finished if self.finished is not None else time.time()) - self.started, 3
            ),
        }


class RateLimit:
    """Paces a byte stream to `rate` bytes per second, measured from the first byte."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._start: float | None = None
        self._sent = 0

    def delay(self, n: int) -> float:
        """Record `n` more bytes; how long to wait so the total stays within the rate."""
        now = self._clock()
        if self._start is None:
            self._start = now
        self._sent += n
        return max(0.0, self._start + self._sent / self.rate - now)


async def paced(chunks: AsyncIterator[bytes], rate: int | None) -> AsyncIterator[bytes]:
    """`chunks`, slowed to `rate` bytes per second when a rate is set."""
    limit = RateLimit(rate) if rate else None
    async for chunk in chunks:
        yield chunk
        if limit is not None and (wait := limit.delay(len(chunk))) > 0:
            await asyncio.sleep(wait)
