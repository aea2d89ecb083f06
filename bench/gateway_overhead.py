"""How much the gateway costs: the same closed-loop load sent straight to a worker's
engine, to the worker's relay (the engine's secret checked, workers/relay.py), and through
controller + gateway (which goes through the relay too), in one run, alternating.

    .venv/bin/python bench/gateway_overhead.py                       # fake engine, c=1,32,256
    .venv/bin/python bench/gateway_overhead.py --concurrency 32 --duration 5
    .venv/bin/python bench/gateway_overhead.py --soak 1000           # 1000 streams held 30 s
    .venv/bin/python bench/gateway_overhead.py --engine vllm --concurrency 32 --modes stream
    .venv/bin/python bench/gateway_overhead.py --paths engine relay   # the relay's hop alone

Everything runs on loopback on this machine. The load generator is one asyncio
loop with one pooled aiohttp session; it shares the cores with the servers, so
compare the gateway/direct ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from fleetserve.cli.harness import Cluster, descendants
from fleetserve.cli.loadgen import closed_loop, for_duration, post_sender
from gateway.settings import GatewaySettings
from workers.settings import WorkerSettings
from workers.vllm.demo_model import ensure_demo_model

MODEL = "bench-model"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU of ``pid`` and (``tree``) its descendants (gateway --processes N)."""
    total = 0
    for p in [pid, *(descendants(pid) if tree else [])]:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Summed resident memory (or VmHWM, the peak) of ``pid`` and its descendants, in MB."""
    total_kb = 0
    for p in [pid, *descendants(pid)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def start_stack(
    engine: str,
    processes: int,
    tokens_per_s: float,
    log_dir: Path,
    workers: int = 1,
    max_resumes: int | None = None,
) -> Cluster:
    """Controller, gateway and ``workers`` workers of the benchmark's model (``max_resumes``:
    the gateway's; 0 turns stream resume off, to measure what it costs)."""
    if engine == "vllm":
        source, flags = str(ensure_demo_model()), []
    else:
        source, flags = "", ["--tokens-per-s", str(tokens_per_s)]
    settings = WorkerSettings(engine=engine, source=source, served_name=MODEL, engine_args=flags)
    gateway = GatewaySettings(processes=processes)
    if max_resumes is not None:
        gateway.max_resumes = max_resumes
    return Cluster.one_model(log_dir, settings, workers, gateway, log_level="WARNING")


@dataclass(frozen=True)
class Route:
    """One way to the model: an OpenAI base URL, the headers it needs, and the Unix socket to
    connect through (the engine's own), if any; ``proxy``: the process whose CPU it costs."""

    url: str
    headers: dict[str, str]
    socket: str | None = None
    proxy: int | None = None
    tree: bool = True  # the proxy's CPU counts its descendants (not a worker's: its engine)


def routes(cluster: Cluster) -> dict[str, Route]:
    """engine: straight to its Unix socket; relay: the worker's address (with the engine's
    secret, as gateways send it); gateway: the endpoint clients use."""
    worker = cluster.routes().workers[0]
    secret = {"Authorization": f"Bearer {worker.engine_secret}"}
    agent = cluster.workers[0].pid
    socket = next(
        argv[argv.index("--uds") + 1]
        for pid in descendants(agent)
        if "--uds" in (argv := Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
    )
    assert cluster.gateway is not None
    return {
        "engine": Route("http://engine/v1", secret, socket),
        "relay": Route(worker.base_url, secret, proxy=agent, tree=False),
        "gateway": Route(f"{cluster.gateway_url}/v1", {}, proxy=cluster.gateway.pid),
    }


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    ttfb_s: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    proxy_cpu_s: float = 0.0

    def merge(self, other: Result, proxy_cpu_s: float) -> None:
        self.latencies_s += other.latencies_s
        self.ttfb_s += other.ttfb_s
        self.errors += other.errors
        self.elapsed_s += other.elapsed_s
        self.proxy_cpu_s += proxy_cpu_s

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def measure(
    route: Route,
    concurrency: int,
    duration_s: float,
    stream: bool,
    max_tokens: int,
    warmup_s: float = 1.0,
) -> Result:
    """Closed-loop load; what started after ``warmup_s`` and ended within ``duration_s`` counts."""
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens,
            "stream": stream,
            "temperature": 0,
        }
    )
    connector: Any = (
        aiohttp.UnixConnector(path=route.socket, limit=0)
        if route.socket
        else aiohttp.TCPConnector(limit=0, force_close=False)
    )
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=route.headers
    ) as session:
        measure_from = time.perf_counter() + warmup_s
        stop_at = measure_from + duration_s
        send = post_sender(session, route.url + "/chat/completions", body, stream)
        outcomes = await closed_loop(send, concurrency, for_duration(warmup_s + duration_s))
    result = Result(elapsed_s=duration_s)
    for outcome in outcomes:
        if outcome.started < measure_from or outcome.ended > stop_at:
            continue
        if outcome.ok:
            result.latencies_s.append(outcome.latency_s)
            result.ttfb_s.append((outcome.first_byte or outcome.ended) - outcome.started)
        else:
            result.errors += 1
    return result


def _row(mode: str, concurrency: int, path: str, r: Result, direct: Result | None) -> list[str]:
    """One table row; ``direct`` is given for the proxied rows, to compare with."""
    cpu = ratio = added = ""
    if direct is not None:
        cpu = f"{1000 * r.proxy_cpu_s / max(len(r.latencies_s), 1):.2f}"
        ratio = f"{r.requests_per_s / direct.requests_per_s:.0%}" if direct.requests_per_s else "-"
        added = f"{r.pct(r.latencies_s, 0.5) - direct.pct(direct.latencies_s, 0.5):.2f}"
    return [
        mode,
        str(concurrency),
        path,
        f"{r.requests_per_s:.0f}",
        f"{r.pct(r.latencies_s, 0.5):.2f}",
        f"{r.pct(r.latencies_s, 0.99):.2f}",
        f"{r.pct(r.ttfb_s, 0.5):.2f}",
        str(r.errors),
        cpu,
        ratio,
        added,
    ]


def run_overhead(args: argparse.Namespace, stack: Cluster, console: Console) -> None:
    every = routes(stack)
    chosen = {path: every[path] for path in args.paths}
    assert stack.gateway is not None
    gateway_pid = stack.gateway.pid
    # Engines compile and cache on their first requests: keep that out of the figures.
    asyncio.run(measure(every["gateway"], 8, args.warmup, True, args.max_tokens, warmup_s=0))
    title = (
        f"gateway vs direct: {args.engine} engine, {args.max_tokens} tokens, {args.duration:.0f}s"
    )
    table = Table(title=title)
    columns = ("mode", "conc", "path", "req/s", "p50 ms", "p99 ms", "TTFB p50 ms", "errors")
    for column in (*columns, "its CPU s/1k req", f"/{args.paths[0]} req/s", "p50 added ms"):
        table.add_column(column, justify="right")
    for concurrency in args.concurrency:
        for mode in args.modes:
            stream = mode == "stream"
            results = {path: Result() for path in chosen}
            for _ in range(args.rounds):  # alternate, so drift hits every path alike
                for path, route in chosen.items():
                    proxy = route.proxy
                    cpu_before = cpu_seconds(proxy, route.tree) if proxy else 0.0
                    run = asyncio.run(
                        measure(
                            route, concurrency, args.duration / args.rounds, stream, args.max_tokens
                        )
                    )
                    cpu = cpu_seconds(proxy, route.tree) - cpu_before if proxy else 0.0
                    results[path].merge(run, cpu)
            first = results[args.paths[0]]
            for path, result in results.items():
                direct = None if result is first else first
                table.add_row(*_row(mode, concurrency, path, result, direct))
            console.print(f"done: {mode} c={concurrency}", style="dim")
    console.print(table)
    console.print(f"gateway peak RSS: {rss_mb(gateway_pid, 'VmHWM'):.0f} MB")


def run_soak(args: argparse.Namespace, stack: Cluster, console: Console) -> None:
    """``--soak N``: N slow streams held for the whole duration; count errors, watch RSS."""
    peak = 0.0
    assert stack.gateway is not None
    gateway_pid = stack.gateway.pid

    async def main() -> Result:
        nonlocal peak
        gateway = Route(f"{stack.gateway_url}/v1", {})
        soak = measure(gateway, args.soak, args.duration, True, args.max_tokens, 3)
        load = asyncio.create_task(soak)
        while not load.done():
            peak = max(peak, rss_mb(gateway_pid))
            await asyncio.sleep(1)
        return await load

    result = asyncio.run(main())
    console.print(
        f"soak: {args.soak} concurrent streams for {args.duration:.0f}s: "
        f"{len(result.latencies_s)} completed, "
        f"{result.errors} errors, p50 {result.pct(result.latencies_s, 0.5):.0f} ms, "
        f"gateway RSS peak {peak:.0f} MB (all processes)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=["fake", "vllm"], default="fake")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument(
        "--modes", nargs="+", choices=["stream", "nonstream"], default=["stream", "nonstream"]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per measurement.")
    parser.add_argument(
        "--rounds", type=int, default=2, help="Direct/gateway alternations per measurement."
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="Seconds of load before measuring."
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--tokens-per-s", type=float, default=0.0, help="Fake engine speed; 0: unlimited."
    )
    parser.add_argument("--processes", type=int, default=1, help="Gateway processes.")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["engine", "relay", "gateway"],
        default=["engine", "relay", "gateway"],
        help="Ways to the model to compare; the first is the baseline of the ratios.",
    )
    parser.add_argument(
        "--max-resumes",
        type=int,
        help="The gateway's --max-resumes (0: stream resume off, the normal path without it).",
    )
    parser.add_argument(
        "--soak", type=int, metavar="CLIENTS", help="Hold this many streams instead."
    )
    args = parser.parse_args()
    if args.soak:
        args.tokens_per_s = args.tokens_per_s or 1.0  # 16 tokens at 1/s: streams of ~16 s
        args.duration = max(args.duration, 30.0)
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
        with console.status("starting controller, gateway and worker"):
            stack = start_stack(
                args.engine,
                args.processes,
                args.tokens_per_s,
                Path(tmp),
                max_resumes=args.max_resumes,
            )
        try:
            (run_soak if args.soak else run_overhead)(args, stack, console)
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
