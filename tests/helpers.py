"""Real processes on loopback for the tests: start, wait for health, load, kill.

Processes are started with fleetserve's own harness (fleetserve/cli/harness.py),
as `fleetserve up` and the benchmarks start them; this module adds free ports,
waiting with deadlines, and a background load that counts what failed where.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from fleetserve import procs
from fleetserve.cli.harness import Cluster, Component, alive, descendants, wait_until
from fleetserve.cli.loadgen import Outcome, closed_loop
from fleetserve.config import ControllerSettings, GatewaySettings
from workers.agent import free_port as agent_free_port

__all__ = ["Component", "alive", "descendants", "wait_until"]


def free_port() -> int:
    return agent_free_port("127.0.0.1")


def ray_head_port() -> int:
    """A free port for a Ray head whose next port (fleetserve puts the dashboard there) is
    free too, below the kernel's ephemeral range: Ray binds its own components to random
    ephemeral ports, and one of them once took the dashboard's port of a free_port()."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20000, low - 1)  # Ray's worker ports end at 19999
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


class LocalCluster(Cluster):
    """Controller and gateway on free loopback ports, and workers added on demand."""

    def __init__(
        self, log_dir: Path, env: dict[str, str], heartbeat_interval_s: float = 1.0
    ) -> None:
        controller = ControllerSettings(
            port=free_port(),
            heartbeat_interval_s=heartbeat_interval_s,
            # a busy 2-core CI machine can stall a process for seconds
            expiry_after_s=5 * heartbeat_interval_s,
        )
        super().__init__(log_dir, controller, GatewaySettings(port=free_port()), env)
        self.controller_port = controller.port
        self.gateway_port = self.gateway_settings.port
        self.start_controller()
        self.start_gateway()

    def add_worker(
        self,
        name: str,
        engine: str,
        *extra: str,
        engine_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Component:
        index = sum(c.name.startswith(f"worker-{name}-") for c in self.components)
        args = ["--engine", engine, "--served-name", name]
        args += ["--controller-url", self.controller_url, *extra, "--", *engine_args]
        return self.start_worker(f"worker-{name}-{index}", args, env)

    def worker_ids(self, model: str, state: str = "ready") -> set[str]:
        return {
            w.worker_id
            for w in self.table().workers
            if model in w.model_names and w.state.value == state
        }

    def gateway_models(self) -> set[str]:
        try:
            data = httpx.get(f"{self.gateway_url}/v1/models", timeout=5).json()["data"]
        except httpx.HTTPError:
            return set()
        return {m["id"] for m in data}

    def wait_workers(self, model: str, count: int, timeout_s: float = 240) -> set[str]:
        """Wait for ``count`` ready workers of ``model``, and for the gateway to route it."""
        return self.wait_routed(model, count, timeout_s)

    @contextlib.contextmanager
    def extra_gateway(self, name: str, *flags: str) -> Iterator[tuple[Component, str]]:
        """Another gateway of this cluster with ``flags``, once it routes every model the
        controller has: (it, /v1 URL)."""
        port = free_port()
        args = ["gateway", "--port", str(port), "--controller-url", self.controller_url, *flags]
        gateway = self.start(name, args)
        url = f"http://127.0.0.1:{port}"
        table = self.table()
        try:
            gateway.wait_http(f"{url}/health")
            wait_until(lambda: self.gateway_routes(table, url), 30, f"{name} to route {table}")
            yield gateway, f"{url}/v1"
        finally:
            gateway.stop()

    def engine_metric(self, model: str, name: str) -> float:
        """A sample of the engine of ``model``'s only worker, read from its own /metrics."""
        (worker,) = [w for w in self.table().workers if model in w.model_names]
        metrics = httpx.get(worker.base_url.removesuffix("/v1") + "/metrics", timeout=5).text
        return float(next(x for x in metrics.splitlines() if x.startswith(name)).split()[-1])

    def controller_metric(self, sample: str) -> float:
        """The value of ``sample`` (name and labels, as exposed) on the controller; 0 if absent."""
        metrics = httpx.get(f"{self.controller_url}/metrics", timeout=5).text
        lines = [line for line in metrics.splitlines() if line.startswith(sample)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    def gateway_metric(self, sample: str) -> float:
        """The value of ``sample`` (name and labels, as exposed) on the gateway; 0 if absent."""
        metrics = httpx.get(f"{self.gateway_url}/metrics", timeout=5).text
        lines = [line for line in metrics.splitlines() if line.startswith(sample)]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    def client(self, **kwargs: Any) -> openai.OpenAI:
        # max_retries=0: a failure must show, not be hidden by the client's own retries.
        return openai.OpenAI(
            base_url=f"{self.gateway_url}/v1", api_key="unused", max_retries=0, **kwargs
        )

    def close(self) -> None:
        for component in reversed(self.components):
            if component.alive():
                component.stop()


@dataclass
class LoadResult:
    ok: int = 0
    failed_before_first_chunk: list[str] = field(default_factory=list)
    failed_mid_stream: list[str] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        if outcome.ok:
            worker = outcome.worker or "?"
            self.workers[worker] = self.workers.get(worker, 0) + 1
            self.ok += 1
        elif outcome.chunks:
            self.failed_mid_stream.append(outcome.error or "")
        else:
            self.failed_before_first_chunk.append(outcome.error or "")


class Load:
    """Closed-loop load through the gateway with the `openai` client, from a background
    thread until stopped; half the clients stream."""

    def __init__(
        self,
        base_url: str,
        model: str,
        concurrency: int = 4,
        max_tokens: int = 16,
        messages: list[dict[str, str]] | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.messages = messages
        self.result = LoadResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "load did not stop"
        return self.result

    def wait_requests(self, count: int, timeout_s: float = 60) -> None:
        start = self.result.ok
        wait_until(
            lambda: self.result.ok - start >= count, timeout_s, f"{count} more successful requests"
        )

    async def _main(self) -> None:
        client = openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60
        )
        async with client:

            async def send(index: int) -> Outcome:
                return await self._request(client, index)

            await closed_loop(send, self.concurrency, self._stop.is_set, self.result.add)

    async def _request(self, client: openai.AsyncOpenAI, index: int) -> Outcome:
        messages = self.messages or [{"role": "user", "content": f"client {index} says hello"}]
        stream = index % 2 == 0  # half the clients stream
        outcome = Outcome()
        try:
            response = await client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=self.max_tokens,
                stream=stream,
            )
            parsed = response.parse()
            if inspect.isawaitable(parsed):
                parsed = await parsed
            if stream:
                async for _ in parsed:
                    outcome.chunks += 1
            else:
                assert parsed.choices[0].message.content is not None
            outcome.worker = response.headers.get("x-fleetserve-worker", "?")
        except Exception as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.ended = time.perf_counter()
        return outcome


@dataclass
class RunningUp:
    """A `fleetserve up` started by `running_up`, all of its workers ready."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path

    def client(self, api_key: str = "x") -> openai.OpenAI:
        base_url = f"http://127.0.0.1:{self.port}/v1"
        return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

    def text(self) -> str:
        return self.out.read_text(errors="replace")


@contextlib.contextmanager
def running_up(
    args: list[str], env: dict[str, str], log_dir: Path, timeout_s: float
) -> Iterator[RunningUp]:
    """`fleetserve up ARGS` on free ports until all workers are ready; then Ctrl-C on exit.

    On a clean exit it checks what a user would: exit code 0, "stopped", and no
    process of the cluster left behind.
    """
    port = free_port()
    out = log_dir / "up.out"
    cmd = [sys.executable, "-m", "fleetserve.cli", "up", "--port", str(port)]
    cmd += ["--controller-port", str(free_port()), "--log-dir", str(log_dir), *args]  # `--` last
    with out.open("wb") as sink:
        up = procs.spawn(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
    running = RunningUp(up, port, out)
    try:
        wait_until(
            lambda: "all workers ready" in running.text() or up.poll() is not None,
            timeout_s,
            "all workers ready",
        )
        assert up.poll() is None, running.text()
        tree = descendants(up.pid)
        yield running
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(120) == 0, running.text()
        assert not [pid for pid in tree if alive(pid)], "processes outlived `fleetserve up`"
        assert "stopped" in running.text()
    finally:
        procs.stop(up, 5)


def hf_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    """What transformers generates greedily: the reference the GGUF file must reproduce."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :]))


def drain_under_load(
    cluster: LocalCluster,
    name: str,
    *,
    concurrency: int = 2,
    max_tokens: int = 64,
    before: int = 4,
    after: int = 0,
    timeout_s: float = 60,
) -> LoadResult:
    """SIGTERM the first worker of ``name`` once ``before`` requests of ``concurrency`` streaming
    clients succeeded; it must drain (exit 0 within ``timeout_s``, say so) and leave no process
    behind, and ``after`` more requests must then succeed (on the name's other workers). The
    load's result, for more checks."""
    victim = next(c for c in cluster.components if c.name == f"worker-{name}-0")
    tree = descendants(victim.pid)
    with Load(cluster.gateway_url, name, concurrency=concurrency, max_tokens=max_tokens) as load:
        load.wait_requests(before)
        victim.proc.send_signal(signal.SIGTERM)
        assert victim.proc.wait(timeout_s) == 0
        if after:
            load.wait_requests(after)
    assert "drained in" in victim.log()
    assert not [pid for pid in tree if alive(pid)], "engine processes outlived the drained worker"
    return load.result


def engine_pid(worker: Component) -> int | None:
    """The engine a worker's agent runs under ``fleetserve.reaper`` (agent -> reaper -> engine)."""
    for pid in descendants(worker.pid):
        with contextlib.suppress(FileNotFoundError):
            if b"fleetserve.reaper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return next(iter(descendants(pid)), None)  # the reaper's one child comes first
    return None
