"""The gateway's lifespan (gateway/server.py), in-process: it stops what it started."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.settings import GatewaySettings
from tests.gateway.inproc import InProcessCluster, eventually, running_gateway

pytestmark = pytest.mark.anyio


class AppFailed(Exception):
    pass


@pytest.mark.parametrize("fails", [False, True], ids=["closed", "failed"])
async def test_the_lifespan_leaves_no_task_behind(cluster: InProcessCluster, fails: bool) -> None:
    """Its routing-table watch and keys-file poll end with it, also when the app fails (they
    would otherwise run on against a closed HTTP session)."""
    before = asyncio.all_tasks()
    settings = GatewaySettings(controller_url=cluster.controller_url)
    with pytest.raises(AppFailed) if fails else contextlib.nullcontext():
        async with running_gateway(settings) as gateway:
            started = asyncio.all_tasks() - before  # (the controller's tasks share the loop)
            assert started, "the lifespan starts its background tasks"

            async def routing() -> bool:
                return await gateway.routing_table_version() is not None

            await eventually(routing, "a routing table")  # the watch is in a long poll now
            if fails:
                raise AppFailed
    assert [task for task in started if not task.done()] == []
