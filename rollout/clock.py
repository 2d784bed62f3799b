"""The one clock of the controller: `now` and `sleep`, read from the running loop.

Every wait in the controller goes through `sleep` and every timestamp through `now`, both
read from the running event loop, so tests can run the engine and the gates on virtual time
(a loop whose `time()` jumps) and assert exact virtual seconds instead of sleeping.
"""

from __future__ import annotations

import asyncio


def now() -> float:
    """Monotonic seconds on the running loop's clock."""
    return asyncio.get_running_loop().time()


async def sleep(seconds: float) -> None:
    """Wait on the loop's clock; the single waiting primitive of the controller."""
    await asyncio.sleep(max(0.0, seconds))
