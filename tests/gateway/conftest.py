"""Fixtures of the in-process gateway tests (tests/gateway/inproc.py): one cluster for the
package.

Async tests run on anyio's pytest plugin (``pytest.mark.anyio``), all in one event
loop, held (``_one_loop``) and so the cluster's servers alive from the first test of
this package to the last. The loop's clock skips its idle waits
(``_loop``): a test of a 1.5 s circuit breaker or a 0.3 s stream timeout takes the time its
code runs, not the timer's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import looptime
import pytest

from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, in_process_cluster


def _loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop whose clock moves only while the loop waits, and then at once to its
    next timer (looptime): timers, timeouts and the gateway's timing rules (gateway/clock.py)
    run without waiting, and the time a busy machine takes to run code counts for nothing."""
    # resolution: looptime moves its clock in whole steps of it (rounded), and asyncio runs a
    # timer once the clock is within its own resolution of it: with looptime's default step
    # (1 us) the clock can stop short of a timer by less than half a step, and stay there.
    return looptime.new_event_loop(resolution=time.get_clock_info("monotonic").resolution)


@pytest.fixture(scope="package")
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"loop_factory": _loop}


@pytest.fixture(scope="package", autouse=True)
async def _one_loop(anyio_backend: object) -> AsyncIterator[None]:
    """Holds this package's loop from its first test to its last, and no longer. anyio runs
    every async test and fixture on one loop while an async fixture holds it and closes it
    when none does: a module's cluster (test_declared.py's) would close it under the
    package's, and the package's cluster would keep it, fake clock and all, for the async
    tests of the packages after this one."""
    yield


@pytest.fixture(scope="package")
async def cluster(anyio_backend: object) -> AsyncIterator[InProcessCluster]:
    """The controller and two models, as tests/test_cluster_fake.py has them: `echo` (two
    workers, alias `echo-alias`) and `other` (one). Tests add models of their own."""
    async with (
        in_process_cluster() as local,
        local.model("echo", 2, aliases=("echo-alias",)),
        local.model("other"),
    ):
        yield local


@pytest.fixture(scope="package")
async def gateway(cluster: InProcessCluster) -> AsyncIterator[GatewayUnderTest]:
    """A gateway with default settings (no keys), shared by the tests."""
    async with cluster.gateway() as shared:
        yield shared
