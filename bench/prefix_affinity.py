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
from gateway_overhead import MODEL, Result, Stack
from rich.console import Console
from rich.table import Table


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def _cache_counters(stack: Stack) -> tuple[float, float]:
    urls = stack.worker_urls()
    hits = sum(_metric(url, "vllm:prefix_cache_hits_total") for url in urls)
    queries = sum(_metric(url, "vllm:prefix_cache_queries_total") for url in urls)
    return hits, queries


async def shared_prefix_load(
    url: str, prompts: list[str], concurrency: int, duration_s: float
) -> Result:
    result = Result()
    rng = random.Random(0)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        stop_at = time.perf_counter() + duration_s

        async def client() -> None:
            while (started := time.perf_counter()) < stop_at:
                body = orjson.dumps(
                    {
                        "model": MODEL,
                        "messages": [
                            {"role": "system", "content": rng.choice(prompts)},
                            {"role": "user", "content": f"Question {rng.randrange(10**6)}?"},
                        ],
                        "max_tokens": 4,
                        "stream": True,
                    }
                )
                first = None
                try:
                    async with session.post(
                        url + "/chat/completions", data=body, headers=headers
                    ) as r:
                        async for _ in r.content.iter_any():
                            first = first or time.perf_counter()
                        ok = r.status == 200
                        if not ok and not result.errors:
                            print(f"first error: HTTP {r.status}")
                except aiohttp.ClientError as exc:
                    ok = False
                    if not result.errors:
                        print(f"first error: {exc}")
                end = time.perf_counter()
                if ok and first is not None:
                    result.latencies_s.append(end - started)
                    result.ttfb_s.append(first - started)
                else:
                    result.errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    result.elapsed_s = duration_s
    return result


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
                stack = Stack(
                    "vllm",
                    1,
                    0.0,
                    Path(tmp),
                    workers=args.workers,
                    routing_policy=policy,
                    engine_args=kv_cache,
                )
            try:
                asyncio.run(
                    shared_prefix_load(stack.gateway_url, prompts, args.concurrency, 3)
                )  # warm-up
                hits_before, queries_before = _cache_counters(stack)
                result = asyncio.run(
                    shared_prefix_load(stack.gateway_url, prompts, args.concurrency, args.duration)
                )
                hits, queries = _cache_counters(stack)
            finally:
                stack.close()
        rate = (hits - hits_before) / max(queries - queries_before, 1)
        table.add_row(
            policy,
            f"{result.requests_per_s:.1f}",
            f"{result.pct(result.ttfb_s, 0.5):.0f}",
            f"{result.pct(result.ttfb_s, 0.99):.0f}",
            str(result.errors),
            f"{rate:.0%}",
        )
        console.print(f"done: {policy}", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
