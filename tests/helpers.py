"""Real processes on loopback for the tests: start, wait for health, load, kill."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from fleetserve import constants, procs
from fleetserve.protocol import RouteTable
from workers.agent import free_port as agent_free_port


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


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.1
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, read from /proc."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class Component:
    """One `fleetserve ...` process with its log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        cmd = [sys.executable, "-m", "fleetserve.cli", *args]
        self.proc = procs.spawn(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, timeout_s: float = 60) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()[-3000:]}"
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout_s, f"{self.name} at {url}")

    def kill_tree(self) -> list[int]:
        """SIGKILL this process and everything below it at once: a machine dying."""
        pids = [self.pid, *descendants(self.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        return pids

    def stop(self, timeout_s: float = 60) -> int:
        tree = descendants(self.pid)
        code = procs.stop(self.proc, timeout_s)
        for pid in tree:  # nothing may outlive a stopped component
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()
        return code


class LocalCluster:
    """Controller and gateway on free loopback ports, and workers added on demand."""

    def __init__(
        self, log_dir: Path, env: dict[str, str], heartbeat_interval_s: float = 1.0
    ) -> None:
        self.log_dir = log_dir
        self.env = env
        self.heartbeat_interval_s = heartbeat_interval_s
        self.controller_port = free_port()
        self.gateway_port = free_port()
        self.controller_url = f"http://127.0.0.1:{self.controller_port}"
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.components: list[Component] = []
        self.controller = self.start_controller()
        self.gateway = self._start(
            "gateway",
            ["gateway", "--port", str(self.gateway_port), "--controller-url", self.controller_url],
        )
        self.gateway.wait_http(f"{self.gateway_url}/health")

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Component:
        component = Component(name, args, self.log_dir, {**self.env, **(env or {})})
        self.components.append(component)
        return component

    def start_controller(self) -> Component:
        interval = self.heartbeat_interval_s
        controller = self._start(
            f"controller-{len(self.components)}",
            [
                "controller",
                "--port",
                str(self.controller_port),
                "--heartbeat-interval-s",
                str(interval),
                "--expiry-after-s",
                str(5 * interval),  # a busy 2-core CI machine can stall a process for seconds
            ],
        )
        controller.wait_http(f"{self.controller_url}/health")
        return controller

    def add_worker(
        self,
        name: str,
        engine: str,
        *extra: str,
        engine_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Component:
        index = sum(c.name.startswith(f"worker-{name}-") for c in self.components)
        args = ["worker", "--engine", engine, "--served-name", name]
        args += ["--controller-url", self.controller_url, *extra, "--", *engine_args]
        return self._start(f"worker-{name}-{index}", args, env)

    def table(self) -> RouteTable:
        return RouteTable.model_validate_json(
            httpx.get(f"{self.controller_url}/workers", timeout=5).content
        )

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
        ids: set[str] = wait_until(
            lambda: len(ids := self.worker_ids(model)) == count and ids,
            timeout_s,
            f"{count} ready workers of {model}",
            0.5,
        )
        # The gateway routes to all of them once it has the controller's table of now, within
        # one long-poll of its watcher (once, in a CI run, its first answer came only at the
        # poll's timeout: a gateway not routing at all still fails here).
        version = self.table().version
        wait_until(
            lambda: model in self.gateway_models() and self._gateway_table_version() >= version,
            constants.WATCH_TIMEOUT_S + 10,
            f"the gateway to route {model}",
        )
        return ids

    def _gateway_table_version(self) -> int:
        version = httpx.get(f"{self.gateway_url}/health", timeout=5).json()["routing_table_version"]
        return -1 if version is None else int(version)

    @contextlib.contextmanager
    def extra_gateway(self, name: str, *flags: str) -> Iterator[tuple[Component, str]]:
        """Another gateway of this cluster with ``flags``, once it routes every model the
        controller has: (it, /v1 URL)."""
        port = free_port()
        args = ["gateway", "--port", str(port), "--controller-url", self.controller_url, *flags]
        gateway = self._start(name, args)
        models = {name for w in self.table().workers for name in w.model_names}
        try:
            gateway.wait_http(f"http://127.0.0.1:{port}/health")
            wait_until(
                lambda: (
                    models <= set(httpx.get(f"http://127.0.0.1:{port}/health").json()["models"])
                ),
                30,
                f"{name} to route {sorted(models)}",
            )
            yield gateway, f"http://127.0.0.1:{port}/v1"
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

    def client(self, **kwargs: Any) -> openai.OpenAI:
        # max_retries=0: a failure must show, not be hidden by the client's own retries.
        return openai.OpenAI(
            base_url=f"{self.gateway_url}/v1", api_key="unused", max_retries=0, **kwargs
        )

    def close(self) -> None:
        for component in reversed(self.components):
            if component.proc.poll() is None:
                component.stop()


@dataclass
class LoadResult:
    ok: int = 0
    failed_before_first_chunk: list[str] = field(default_factory=list)
    failed_mid_stream: list[str] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=dict)


class Load:
    """Closed-loop load through the gateway from a background thread, until stopped."""

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
            await asyncio.gather(*(self._loop(client, i) for i in range(self.concurrency)))

    async def _loop(self, client: openai.AsyncOpenAI, index: int) -> None:
        messages = self.messages or [{"role": "user", "content": f"client {index} says hello"}]
        stream = index % 2 == 0  # half the clients stream
        while not self._stop.is_set():
            chunks = 0
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
                        chunks += 1
                else:
                    assert parsed.choices[0].message.content is not None
                worker = response.headers.get("x-fleetserve-worker", "?")
                self.result.workers[worker] = self.result.workers.get(worker, 0) + 1
                self.result.ok += 1
            except Exception as exc:
                target = (
                    self.result.failed_mid_stream
                    if chunks
                    else self.result.failed_before_first_chunk
                )
                target.append(f"{type(exc).__name__}: {exc}")


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
