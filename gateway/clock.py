"""The clock of the gateway's timing rules: its event loop's (``loop.time()``).

Deadlines, holds, circuit breakers, the retry budget, quotas and intervals count in the clock
that ``asyncio.sleep`` and ``asyncio.timeout`` count in, so every timing rule reads one clock,
and a test loop whose clock skips idle waits (tests/gateway/conftest.py) runs them without
waiting. Latencies reported as metrics are measured with ``time.perf_counter``: uvloop's loop
clock counts whole milliseconds, and the gateway adds well under one to a request.
"""

from __future__ import annotations

import asyncio


def now() -> float:
    """The running event loop's time, in seconds (monotonic)."""
    return asyncio.get_running_loop().time()
