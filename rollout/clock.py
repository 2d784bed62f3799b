"""The one clock of the controller: `now` and `sleep`, read from the running loop.

Every wait in the controller goes through `sleep` and every timestamp through `now`, both
read from the running event loop, so tests can run the engine and the gates on virtual time
(a loop whose `time()` jumps) and assert exact virtual seconds instead of sleeping.

`running_loop` is `asyncio.get_running_loop()` without its `getpid()` per call (CPython's
check that a forked child does not use its parent's loop): that is a system call, and on a
VM with page-table isolation a costly one, whose cost grows with the heap (the TLB is
flushed). The engine reads the clock about 25 times per node; at 100,000 nodes a third
of the controller's samples (py-spy, native frames) were in that getpid(). The last
loop found is kept and used again while it is running in the calling thread (its
`_thread_id`, which asyncio's base loop sets while it runs and clears when it stops);
anything else asks asyncio.
"""

from __future__ import annotations

import asyncio
import threading

_get_ident = threading.get_ident
_last: asyncio.AbstractEventLoop | None = None


def running_loop() -> asyncio.AbstractEventLoop:
    """The running loop of this thread (RuntimeError when none runs), as
    asyncio.get_running_loop() says, without a system call on the usual path."""
    global _last
    loop = _last
    if loop is not None and getattr(loop, "_thread_id", None) == _get_ident():
        return loop
    loop = _last = asyncio.get_running_loop()
    return loop


def now() -> float:
    """Monotonic seconds on the running loop's clock."""
    return running_loop().time()


async def sleep(seconds: float) -> None:
    """Wait on the loop's clock; the single waiting primitive of the controller."""
    await asyncio.sleep(max(0.0, seconds))
