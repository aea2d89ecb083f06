"""Real processes on loopback for the tests: start, wait for health, load, kill.

Processes are started with fleetserve's own harness (fleetserve/cli/harness.py),
as `fleetserve up` and the benchmarks start them; this module adds free ports,
waiting with deadlines, and a background load that counts what failed where.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import re
import signal
import socket
import stat
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

from controller.settings import ControllerSettings
from fleetserve import procs
from fleetserve.cli.harness import Cluster, Component, alive, descendants, wait_until
from fleetserve.cli.loadgen import Outcome, closed_loop
from gateway.settings import GatewaySettings
from workers.agent import free_port as agent_free_port

__all__ = ["Component", "alive", "descendants", "wait_until"]


def free_port() -> int:
    return agent_free_port("127.0.0.1")


def ray_head_port() -> int:
    """A free port for a Ray head whose next port (where fleetserve once put the dashboard, and
    SkyPilot's Ray sits for the default 6379) is free too, so that a test can take it, below
    the kernel's ephemeral range: Ray binds its own components to random ephemeral ports."""
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


@contextlib.contextmanager
def ports_taken(*ports: int) -> Iterator[list[int]]:
    """Listen on each of ``ports`` on every address, as SkyPilot's own Ray does on the nodes it
    launches (6380, dashboard 8266); a port some other process holds is taken already. Yields
    the ports this test holds."""
    held: list[socket.socket] = []
    try:
        for port in ports:
            sock = socket.socket()
            try:
                sock.bind(("0.0.0.0", port))
                sock.listen()
            except OSError:
                sock.close()
                continue
            held.append(sock)
        yield [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


#: The ports SkyPilot's own Ray holds on every node it launches (sky/skylet/constants.py).
SKYPILOT_RAY_PORTS = (6380, 8266)


def ray_dashboard(head_log: str) -> str:
    """The Ray dashboard a multi-node replica's head started (a free port, from its log)."""
    found = re.search(r"its dashboard at (http://127\.0\.0\.1:\d+)", head_log)
    assert found, "the head's log names no Ray dashboard"
    return found.group(1)


class LocalCluster(Cluster):
    """Controller and gateway on free loopback ports, and workers added on demand."""

    def __init__(
        self,
        log_dir: Path,
        env: dict[str, str],
        heartbeat_interval_s: float = 1.0,
        cluster_token_file: Path | None = None,
        controller: ControllerSettings | None = None,
        gateway: GatewaySettings | None = None,
    ) -> None:
        """``controller``, ``gateway``: their settings (ports replaced by free ones)."""
        controller = (controller or ControllerSettings()).model_copy(
            update={
                "port": free_port(),
                "heartbeat_interval_s": heartbeat_interval_s,
                # a busy 2-core CI machine can stall a process for seconds
                "expiry_after_s": 5 * heartbeat_interval_s,
            }
        )
        gateway = (gateway or GatewaySettings()).model_copy(update={"port": free_port()})
        super().__init__(log_dir, controller, gateway, env, cluster_token_file=cluster_token_file)
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
        if self.cluster_token_file:
            args += ["--cluster-token-file", self.cluster_token_file]
        gateway = self.start(name, args)
        url = f"http://127.0.0.1:{port}"
        table = self.table()
        try:
            gateway.wait_http(f"{url}/health")
            wait_until(lambda: self.gateway_routes(table, url), 30, f"{name} to route {table}")
            yield gateway, f"{url}/v1"
        finally:
            gateway.stop()

    def engine(self, worker_id: str) -> httpx.Client:
        """A client of a worker's engine, with the engine's secret: as a gateway reaches it."""
        (view,) = [w for w in self.routes().workers if w.worker_id == worker_id]
        return httpx.Client(
            base_url=view.base_url.removesuffix("/v1"),
            headers={"Authorization": f"Bearer {view.engine_secret}"},
            timeout=5,
        )

    def engine_metric(self, model: str, name: str) -> float:
        """A sample of the engine of ``model``'s only worker, read from its own /metrics."""
        (worker,) = [w for w in self.table().workers if model in w.model_names]
        with self.engine(worker.worker_id) as engine:
            metrics = engine.get("/metrics").text
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
        """Workers drain together, then the rest stops (one by one, 15 workers took 18 s)."""
        self.stop()


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


@dataclass
class Answer:
    """One request a Load sent and what came back (``record=True``)."""

    kind: str  # "chat" or "completion"
    prompt: str
    max_tokens: int
    text: str
    worker: str
    started: float
    ended: float

    def body(self, model: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The request, as a JSON body for the answer's own endpoint (non-streaming)."""
        field: dict[str, Any] = (
            {"messages": [{"role": "user", "content": self.prompt}]}
            if self.kind == "chat"
            else {"prompt": self.prompt}
        )
        return {"model": model, **field, "max_tokens": self.max_tokens, **extra}

    def direct(self, cluster: Cluster, model: str, extra: dict[str, Any], timeout_s: float) -> str:
        """What a live worker of ``model`` answers to the same request, asked directly (with
        its engine's secret, as gateways ask): the uninterrupted answer."""
        (live,) = [w for w in cluster.routes().workers if model in w.model_names][:1]
        path = "/chat/completions" if self.kind == "chat" else "/completions"
        response = httpx.post(
            live.base_url + path,
            json=self.body(model, extra),
            headers={"Authorization": f"Bearer {live.engine_secret}"},
            timeout=timeout_s,
        )
        choice = response.json()["choices"][0]
        return str(choice["message"]["content"] if self.kind == "chat" else choice["text"])


class Load:
    """Closed-loop load through the gateway with the `openai` client, from a background
    thread until stopped; half the clients stream (all of them with ``all_stream``).

    ``completions``: half the clients ask /v1/completions instead of chat; ``max_tokens``
    a (low, high) range spreads the answers' lengths; ``extra``: more fields for every
    request (``temperature: 0``); ``record``: every answer is kept in ``answers``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        concurrency: int = 4,
        max_tokens: int | tuple[int, int] = 16,
        messages: list[dict[str, str]] | None = None,
        *,
        all_stream: bool = False,
        completions: bool = False,
        extra: dict[str, Any] | None = None,
        record: bool = False,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.messages = messages
        self.all_stream = all_stream
        self.completions = completions
        self.extra = extra or {}
        self.record = record
        self.answers: list[Answer] = []
        self.result = LoadResult()
        self._sent = 0
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

    def _next_max_tokens(self) -> int:
        self._sent += 1
        if isinstance(self.max_tokens, int):
            return self.max_tokens
        low, high = self.max_tokens
        return low + (self._sent * 37) % (high - low + 1)  # spread, and the same every run

    async def _request(self, client: openai.AsyncOpenAI, index: int) -> Outcome:
        chat = not (self.completions and index % 2)
        prompt = f"client {index} request {self._sent} says hello"
        messages = self.messages or [{"role": "user", "content": prompt}]
        stream = self.all_stream or index % 2 == 0  # half the clients stream
        max_tokens = self._next_max_tokens()
        outcome = Outcome()
        pieces: list[str] = []
        try:
            create = (
                client.chat.completions.with_raw_response.create
                if chat
                else client.completions.with_raw_response.create
            )
            request: dict[str, Any] = {"messages": messages} if chat else {"prompt": prompt}
            response = await create(  # type: ignore[call-overload]
                model=self.model,
                max_tokens=max_tokens,
                stream=stream,
                extra_body=self.extra,
                **request,
            )
            parsed = response.parse()
            if inspect.isawaitable(parsed):
                parsed = await parsed
            if stream:
                async for chunk in parsed:
                    outcome.chunks += 1
                    pieces.append(_chunk_text(chunk))
            else:
                choice = parsed.choices[0]
                text = choice.message.content if chat else choice.text
                assert text is not None
                pieces.append(text)
            outcome.worker = response.headers.get("x-fleetserve-worker", "?")
        except Exception as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.ended = time.perf_counter()
        if self.record and outcome.ok:
            kind = "chat" if chat else "completion"
            text = "".join(pieces)
            answer = Answer(
                kind,
                messages[-1]["content"] if chat else prompt,
                max_tokens,
                text,
                outcome.worker or "?",
                outcome.started,
                outcome.ended,
            )
            self.answers.append(answer)
        return outcome


def _chunk_text(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    return str((choice.delta.content or "") if hasattr(choice, "delta") else choice.text)


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


def up_refuses(cluster_file: Path) -> subprocess.CompletedProcess[str]:
    """`fleetserve up -f CLUSTER_FILE`, which must refuse the file before it starts anything:
    a failing exit code and no gateway in its output. What it printed, for what it said."""
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "up", "-f", str(cluster_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0, result.stderr
    assert "gateway" not in result.stdout  # nothing was started
    return result


@contextlib.contextmanager
def running_up(
    args: list[str],
    env: dict[str, str],
    log_dir: Path,
    timeout_s: float,
    until: str = "all workers ready",
) -> Iterator[RunningUp]:
    """`fleetserve up ARGS` on free ports until all workers are ready (until its output says
    ``until``); then Ctrl-C on exit.

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
            lambda: until in running.text() or up.poll() is not None,
            timeout_s,
            until,
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
    """SIGTERM the first live worker of ``name`` once ``before`` requests of ``concurrency``
    streaming clients succeeded; it must drain (exit 0 within ``timeout_s``, say so) and leave
    no process behind, and ``after`` more requests must then succeed (on the name's other
    workers). The load's result, for more checks."""
    victim = next(
        c for c in cluster.components if c.name.startswith(f"worker-{name}-") and c.alive()
    )
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


def listener_pid(port: int) -> int:
    """The process listening on TCP ``port`` on this machine (read from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return int(pid)
    raise AssertionError(f"nothing listens on port {port}")


def engine_pid(worker: Component | int) -> int | None:
    """The engine a worker's agent (its Component, or its pid) runs under ``fleetserve.reaper``
    (agent -> reaper -> engine)."""
    for pid in descendants(worker if isinstance(worker, int) else worker.pid):
        with contextlib.suppress(FileNotFoundError):
            if b"fleetserve.reaper" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return next(iter(descendants(pid)), None)  # the reaper's one child comes first
    return None


#: Routes of an engine that generate, tokenize or reveal something (vLLM 0.32's among them).
ENGINE_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("POST", "/invocations"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/pooling"),
    ("POST", "/score"),
    ("POST", "/rerank"),
    ("GET", "/metrics"),
    ("POST", "/collective_rpc"),
]
# 127.0.0.0/8 and ::1 as /proc/net/tcp{,6} write local addresses.
_LOOPBACK_HEX = ("0100007F:", "00000000000000000000000001000000:")


def tcp_listeners(pid: int) -> list[str]:
    """The TCP addresses ``pid`` listens on, as /proc/net/tcp writes them (hex)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                found.append(fields[1])
    return found


def assert_engine_refuses_everyone_but_gateways(cluster: Cluster, worker_id: str) -> None:
    """The red team's check of one worker's engine (tests/test_security.py): every route, at
    the address the worker registered, is refused without the engine's secret (with none, a
    wrong one, one a character longer); the engine listens on a Unix socket in a directory
    only its user may enter, and on no TCP port outside loopback; with the secret, as a
    gateway sends it, it answers; the secret is in no line the worker logged."""
    (worker,) = [w for w in cluster.routes().workers if w.worker_id == worker_id]
    assert worker.engine_secret
    base = worker.base_url.removesuffix("/v1")
    model = worker.model_names[0]
    body = {"model": model, "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}
    for authorization in (None, "Bearer wrong", f"Bearer {worker.engine_secret}x"):
        headers = {"authorization": authorization} if authorization else {}
        for method, path in ENGINE_ROUTES:
            response = httpx.request(method, base + path, json=body, headers=headers, timeout=10)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["error"]["code"] == "invalid_engine_secret"
    # GET /health alone is open (probes, other routers): an empty answer, as on every server
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    agent = listener_pid(int(base.rsplit(":", 1)[1]))
    engine = engine_pid(agent)
    assert engine is not None
    for pid in [engine, *descendants(engine)]:
        with contextlib.suppress(FileNotFoundError):
            listening = tcp_listeners(pid)
            assert all(address.startswith(_LOOPBACK_HEX) for address in listening), listening
    argv = Path(f"/proc/{engine}/cmdline").read_text().split("\0")
    flag = "--uds" if "--uds" in argv else "--host"  # llama-server: --host PATH.sock
    socket_path = Path(argv[argv.index(flag) + 1])
    assert socket_path.suffix == ".sock"
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    secret = {"authorization": f"Bearer {worker.engine_secret}"}
    assert httpx.get(base + "/v1/models", headers=secret, timeout=10).status_code == 200
    (component,) = [c for c in cluster.workers if c.pid == agent]
    assert worker.engine_secret not in component.log()
