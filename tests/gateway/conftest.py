"""Fixtures of the in-process gateway tests (tests/gateway/inproc.py): one cluster per session.

Async tests run on anyio's pytest plugin (``pytest.mark.anyio``), all in one event
loop: the session-scoped ``anyio_backend`` keeps the loop, and so the cluster's
servers, alive from the first such test to the last.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, in_process_cluster


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def cluster(anyio_backend: str) -> AsyncIterator[InProcessCluster]:
    """The controller and two models, as tests/test_cluster_fake.py has them: `echo` (two
    workers, alias `echo-alias`) and `other` (one). Tests add models of their own."""
    async with (
        in_process_cluster() as local,
        local.model("echo", 2, aliases=("echo-alias",)),
        local.model("other"),
    ):
        yield local


@pytest.fixture(scope="session")
async def gateway(cluster: InProcessCluster) -> AsyncIterator[GatewayUnderTest]:
    """A gateway with default settings (no keys), shared by the tests."""
    async with cluster.gateway() as shared:
        yield shared
