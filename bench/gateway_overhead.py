"""How much the gateway costs: the same closed-loop load sent straight to a worker's
engine and through controller + gateway, in one run, alternating.

    .venv/bin/python bench/gateway_overhead.py                       # fake engine, c=1,32,256
    .venv/bin/python bench/gateway_overhead.py --concurrency 32 --duration 5
    .venv/bin/python bench/gateway_overhead.py --soak 1000           # 1000 streams held 30 s
    .venv/bin/python bench/gateway_overhead.py --engine vllm --concurrency 32 --modes stream

Everything runs on loopback on this machine. The load generator is one asyncio
loop with one pooled aiohttp session; it shares the cores with the servers, so
compare the gateway/direct ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetserve import procs
from fleetserve.demo_model import ensure_demo_model
from workers.agent import free_port

MODEL = "bench-model"
HOST = "127.0.0.1"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _wait(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        for child in map(int, children):
            pids += _tree(child)
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its descendants (gateway --processes N)."""
    total = 0
    for p in _tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    """Summed resident memory (or VmHWM, the peak) of ``pid`` and its descendants, in MB."""
    total_kb = 0
    for p in _tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


class Stack:
    """Controller, gateway and ``workers`` workers of one model, started with the fleetserve CLI."""

    def __init__(
        self,
        engine: str,
        processes: int,
        tokens_per_s: float,
        log_dir: Path,
        workers: int = 1,
        routing_policy: str = "least_load",
        engine_args: tuple[str, ...] = (),
    ) -> None:
        self.log_dir = log_dir
        controller_port, gateway_port = free_port(HOST), free_port(HOST)
        self.controller_url = f"http://127.0.0.1:{controller_port}"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}/v1"
        self.procs: list[subprocess.Popen[bytes]] = []
        self._start("controller", "--port", str(controller_port))
        self.gateway = self._start(
            "gateway",
            "--port",
            str(gateway_port),
            "--controller-url",
            self.controller_url,
            "--processes",
            str(processes),
        )
        worker = ["worker", "--engine", engine, "--served-name", MODEL]
        worker += ["--controller-url", self.controller_url, "--routing-policy", routing_policy]
        if engine == "vllm":
            worker += ["--model", str(ensure_demo_model()), "--", *engine_args]
        else:
            worker += ["--", "--tokens-per-s", str(tokens_per_s), *engine_args]
        cores = sorted(os.sched_getaffinity(0))
        for i in range(workers):
            # one core each, as `fleetserve up` places CPU engines (see workers/placement.py)
            env = {"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])} if workers > 1 else {}
            self._start(*worker, env=env, log_name=f"worker-{i}")
        _wait(lambda: len(self.worker_urls()) == workers, 600, "the workers to register")
        self.direct_url = self.worker_urls()[0]
        _wait(
            lambda: MODEL in httpx.get(f"{self.gateway_url}/models").text,
            30,
            "the gateway to route",
        )

    def _start(
        self, *args: str, env: dict[str, str] | None = None, log_name: str = ""
    ) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"{log_name or args[0]}.log").open("wb")
        cmd = [sys.executable, "-m", "fleetserve.cli", "--log-level", "WARNING", *args]
        proc = procs.spawn(
            cmd, env=procs.env_with(**(env or {})), stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def worker_urls(self) -> list[str]:
        workers = httpx.get(f"{self.controller_url}/workers").json()["workers"]
        return sorted(str(w["base_url"]) for w in workers)

    def close(self) -> None:
        for proc in reversed(self.procs):
            procs.stop(proc, 60)


@dataclass
class Result:
    latencies_s: list[float] = field(default_factory=list)
    ttfb_s: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0
    gateway_cpu_s: float = 0.0

    def merge(self, other: Result, gateway_cpu_s: float) -> None:
        self.latencies_s += other.latencies_s
        self.ttfb_s += other.ttfb_s
        self.errors += other.errors
        self.elapsed_s += other.elapsed_s
        self.gateway_cpu_s += gateway_cpu_s

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def closed_loop(
    url: str,
    concurrency: int,
    duration_s: float,
    stream: bool,
    max_tokens: int,
    warmup_s: float = 1.0,
) -> Result:
    """``concurrency`` clients, each sending its next request when the last one is done."""
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens,
            "stream": stream,
            "temperature": 0,
        }
    )
    headers = {"content-type": "application/json"}
    result = Result()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        measure_from = started + warmup_s
        stop_at = measure_from + duration_s

        async def client() -> None:
            while (now := time.perf_counter()) < stop_at:
                first = None
                try:
                    async with session.post(
                        url + "/chat/completions", data=body, headers=headers
                    ) as response:
                        if stream:
                            async for _ in response.content.iter_any():
                                if first is None:
                                    first = time.perf_counter()
                        else:
                            await response.read()
                            first = time.perf_counter()
                        ok = response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                end = time.perf_counter()
                if now >= measure_from and end <= stop_at:
                    if ok:
                        result.latencies_s.append(end - now)
                        result.ttfb_s.append((first or end) - now)
                    else:
                        result.errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        result.elapsed_s = duration_s
    return result


def _row(mode: str, concurrency: int, path: str, r: Result, direct: Result | None) -> list[str]:
    """One table row; ``direct`` is given for the gateway row, to compare with."""
    cpu = ratio = added = ""
    if direct is not None:
        cpu = f"{1000 * r.gateway_cpu_s / max(len(r.latencies_s), 1):.2f}"
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


def run_overhead(args: argparse.Namespace, stack: Stack, console: Console) -> None:
    # Engines compile and cache on their first requests: keep that out of the figures.
    asyncio.run(closed_loop(stack.gateway_url, 8, args.warmup, True, args.max_tokens, warmup_s=0))
    title = (
        f"gateway vs direct: {args.engine} engine, {args.max_tokens} tokens, {args.duration:.0f}s"
    )
    table = Table(title=title)
    columns = ("mode", "conc", "path", "req/s", "p50 ms", "p99 ms", "TTFB p50 ms", "errors")
    for column in (*columns, "gw CPU s/1k req", "gw/direct req/s", "p50 added ms"):
        table.add_column(column, justify="right")
    for concurrency in args.concurrency:
        for mode in args.modes:
            stream = mode == "stream"
            results = {"direct": Result(), "gateway": Result()}
            for _ in range(args.rounds):  # alternate, so drift hits both paths alike
                for path, url in (("direct", stack.direct_url), ("gateway", stack.gateway_url)):
                    cpu_before = cpu_seconds(stack.gateway.pid)
                    run = asyncio.run(
                        closed_loop(
                            url, concurrency, args.duration / args.rounds, stream, args.max_tokens
                        )
                    )
                    results[path].merge(run, cpu_seconds(stack.gateway.pid) - cpu_before)
            table.add_row(*_row(mode, concurrency, "direct", results["direct"], None))
            table.add_row(
                *_row(mode, concurrency, "gateway", results["gateway"], results["direct"])
            )
            console.print(f"done: {mode} c={concurrency}", style="dim")
    console.print(table)
    console.print(f"gateway peak RSS: {rss_mb(stack.gateway.pid, 'VmHWM'):.0f} MB")


def run_soak(args: argparse.Namespace, stack: Stack, console: Console) -> None:
    """``--soak N``: N slow streams held for the whole duration; count errors, watch RSS."""
    peak = 0.0

    async def main() -> Result:
        nonlocal peak
        load = asyncio.create_task(
            closed_loop(
                stack.gateway_url, args.soak, args.duration, True, args.max_tokens, warmup_s=3
            )
        )
        while not load.done():
            peak = max(peak, rss_mb(stack.gateway.pid))
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
        "--soak", type=int, metavar="CLIENTS", help="Hold this many streams instead."
    )
    args = parser.parse_args()
    if args.soak:
        args.tokens_per_s = args.tokens_per_s or 1.0  # 16 tokens at 1/s: streams of ~16 s
        args.duration = max(args.duration, 30.0)
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
        with console.status("starting controller, gateway and worker"):
            stack = Stack(args.engine, args.processes, args.tokens_per_s, Path(tmp))
        try:
            (run_soak if args.soak else run_overhead)(args, stack, console)
        finally:
            stack.close()


if __name__ == "__main__":
    main()
