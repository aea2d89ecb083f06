"""Each model is routed by the policy the controller's table gives it (gateway/table.py),
in-process: workers registered with a ``routing_policy``, the gateway watching the table, each
policy seen in the ``x-fleetserve-worker`` header of the answers."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

import aiohttp
import looptime
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.table import RouteTableWatcher
from tests.gateway.inproc import WAIT_S, GatewayUnderTest, InProcessCluster, eventually

pytestmark = pytest.mark.anyio

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def _worker(
    gateway: GatewayUnderTest,
    model: str,
    messages: list[ChatCompletionMessageParam] = HI,
    max_tokens: int = 1,
    user: str | None = None,
    session_header: str | None = None,
) -> str:
    """Who answered one request."""
    raw = await gateway.client().chat.completions.with_raw_response.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        user=openai.omit if user is None else user,
        extra_headers={} if session_header is None else {"x-session-id": session_header},
    )
    return raw.headers["x-fleetserve-worker"]


@pytest.mark.parametrize("policy", ["round_robin", "power_of_two"])
async def test_round_robin_and_power_of_two_use_every_worker(
    cluster: InProcessCluster, gateway: GatewayUnderTest, policy: str
) -> None:
    name = policy.replace("_", "-")
    async with cluster.model(name, 2, routing_policy=policy) as workers:
        picks = [await _worker(gateway, name) for _ in range(12)]
    assert set(picks) == set(workers.ids)
    if policy == "round_robin":  # strictly in turn
        assert all(a != b for a, b in itertools.pairwise(picks))


async def test_an_alias_shares_its_models_round_robin(
    cluster: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    """One policy per model: asking by name and by alias in turn still takes workers in turn."""
    async with cluster.model("rr", 2, aliases=("rr-alias",), routing_policy="round_robin"):
        picks = [await _worker(gateway, name) for name in ["rr", "rr-alias"] * 4]
    assert all(a != b for a, b in itertools.pairwise(picks)), picks


async def test_least_load_avoids_the_busy_worker(
    cluster: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    # 10 tokens/s: a request for 8 tokens is busy 0.7 s, one for 1 token answers at once
    async with cluster.model("ll", 2, routing_policy="least_load", tokens_per_s=10) as ll:
        long = asyncio.create_task(_worker(gateway, "ll", max_tokens=8))
        await eventually(
            lambda: sum(engine.running for engine in ll.engines.values()) == 1,
            "the long request at an engine",
        )
        (busy,) = [worker for worker, engine in ll.engines.items() if engine.running]
        quick = {await _worker(gateway, "ll") for _ in range(6)}
        assert await long == busy
    assert quick == set(ll.ids) - {busy}


async def test_prefix_affinity_keeps_a_prefix_home_and_spills_a_hot_one(
    cluster: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    async with cluster.model(
        "cached", 3, routing_policy="prefix_affinity", tokens_per_s=50
    ) as cached:

        def conversation(system: str, question: str) -> list[ChatCompletionMessageParam]:
            return [{"role": "system", "content": system}, {"role": "user", "content": question}]

        prompts = [f"You are assistant {i}, an expert in topic {i}. " * 10 for i in range(12)]
        homes = {}
        for system in prompts:
            seen = {
                await _worker(gateway, "cached", conversation(system, f"q{q}")) for q in range(3)
            }
            assert len(seen) == 1, "one prefix, one worker while the cluster is quiet"
            homes[system] = seen.pop()
        assert set(homes.values()) == set(cached.ids)  # 12 prefixes use all 3 workers

        # One hot prefix, 12 at once (more than a worker's share): it spills to other workers.
        hot = conversation(prompts[0], "go")
        answered = await asyncio.gather(
            *(_worker(gateway, "cached", hot, max_tokens=16) for _ in range(12))
        )
    by_worker = Counter(answered)
    assert len(by_worker) > 1, by_worker
    assert by_worker[homes[prompts[0]]] == max(by_worker.values()) < 12  # home first, not all


async def test_a_session_sticks_to_one_worker(
    cluster: InProcessCluster, gateway: GatewayUnderTest
) -> None:
    """The x-session-id header or the request's `user` field: the same session, the same worker."""
    async with cluster.model("sticky", 2, routing_policy="session") as sticky:
        homes: dict[str, set[str]] = {}
        for i in range(32):
            session = f"session-{i % 8}"
            if i % 2:
                worker = await _worker(gateway, "sticky", user=session)
            else:
                worker = await _worker(gateway, "sticky", session_header=session)
            homes.setdefault(session, set()).add(worker)
    assert all(len(workers) == 1 for workers in homes.values()), homes
    assert set().union(*homes.values()) == set(sticky.ids)  # 8 sessions spread over both


async def test_the_watcher_stops_when_cancelled_as_its_overdue_deadline_fires() -> None:
    """A gateway closing after its event loop was paused past a long poll's deadline (a busy
    machine; between the in-process tests, the loop does not run) stops its watcher.

    On resume the overdue deadline fires first and the lifespan's cancellation comes next,
    before the watcher runs again. aiohttp 3.14's own total timeout turned that cancellation
    into a TimeoutError, and the watcher polled on: pytest hung in the session's teardown.
    """
    opened = asyncio.Event()

    async def never_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.set()
        await asyncio.sleep(3600)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    async with server, aiohttp.ClientSession() as session:
        watcher = RouteTableWatcher(f"http://127.0.0.1:{port}", session, deadline_s=0.2)
        task = asyncio.create_task(watcher.run())
        await asyncio.wait_for(opened.wait(), WAIT_S)
        # the loop paused past the deadline: the test loop's clock jumps (conftest.py)
        assert isinstance(loop, looptime.LoopTimeEventLoop)
        loop.setup_looptime(start=loop.time() + 0.5)
        # the deadline's callback is due now and runs first; the cancellation right after it
        loop.call_soon(lambda: loop.call_soon(task.cancel))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)
