"""Attached servers (engine openai): two llama-servers started outside fleetserve, each with
an API key, attached as the two replicas of one model and routed by name; one is killed and
restarted. Nothing here is mocked (a vLLM server attached the same way is in
tests/test_api_vllm.py).
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from fleetserve import procs
from gateway.settings import GatewaySettings
from tests.conftest import module_log_dir
from tests.helpers import Load, LocalCluster, free_port, wait_until
from workers.llamacpp.python_server import cpu_has_amx
from workers.llamacpp.source import server_binary

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        server_binary() is None, reason="needs llama-server: scripts/setup.sh --llamacpp builds it"
    ),
]

NAME = "tiny-ext"
SECRET = "sk-llama-9a8b7c6d"
SECRET_NAME = "LLAMA_KEY"
HEARTBEAT_S = 1.0
LOG_DIR = module_log_dir("test_attached")


@dataclass
class Server:
    """A llama-server someone started: its port, and its process while it runs."""

    port: int
    gguf: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [str(server_binary()), "--model", str(self.gguf), "--alias", "tiny-gguf"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--metrics", "--no-webui"]
        cmd += ["--api-key", SECRET, "--parallel", "2", "--threads", "1"]
        if cpu_has_amx():
            cmd.append("--no-repack")  # see workers/llamacpp/engine.py
        with (LOG_DIR / f"llama-server-{self.port}.log").open("ab") as log:
            self.proc = procs.spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.answers, 60, f"llama-server on port {self.port}")

    def answers(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def servers(gguf_f32: Path) -> Iterator[list[Server]]:
    started = [Server(free_port(), gguf_f32), Server(free_port(), gguf_f32)]
    try:
        for server in started:
            server.start()
        yield started
    finally:
        for server in started:
            if server.proc is not None:
                procs.stop(server.proc, 10)


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str], servers: list[Server]) -> Iterator[LocalCluster]:
    env = {**fleet_env, f"FLEETSERVE_SECRET_{SECRET_NAME}": SECRET}
    local = LocalCluster(
        LOG_DIR, env, heartbeat_interval_s=HEARTBEAT_S, gateway=GatewaySettings(access_log=True)
    )
    try:
        for server in servers:
            local.add_worker(
                NAME,
                "openai",
                *("--url", f"{server.url}/v1", "--upstream-key", SECRET_NAME),
                *("--endpoint", "/v1/chat/completions", "--endpoint", "/v1/completions"),
                *("--endpoint", "/v1/messages", "--capacity", "2"),
            )
        local.wait_workers(NAME, 2, timeout_s=60)
        yield local
    finally:
        local.close()


def _worker_of(cluster: LocalCluster, server: Server) -> str:
    (worker,) = [w.worker_id for w in cluster.table().workers if w.base_url == f"{server.url}/v1"]
    return worker


def _complete(cluster: LocalCluster, prompt: str = "The logging module") -> str:
    """One completion through the gateway: the worker that answered."""
    client = cluster.client()
    raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=4)
    assert raw.parse().choices[0].text is not None
    return raw.headers["x-fleetserve-worker"]


def test_attached_servers_are_routed_by_name_with_their_key(
    cluster: LocalCluster, servers: list[Server]
) -> None:
    views = {w.worker_id: w for w in cluster.table().workers}
    for server in servers:
        view = views[_worker_of(cluster, server)]
        assert (view.engine, view.capacity, view.upstream_key) == ("openai", 2, SECRET_NAME)
        assert view.endpoints == ["/v1/chat/completions", "/v1/completions", "/v1/messages"]
    # the servers want their key: the gateway sends it (the client's key is the gateway's)
    refused = httpx.post(f"{servers[0].url}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert refused.status_code == 401
    served = {_complete(cluster, f"hello {i}") for i in range(10)}
    assert served == {_worker_of(cluster, server) for server in servers}
    chat = cluster.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError) as refused_endpoint:  # not in its --endpoint list
        cluster.client().embeddings.create(model=NAME, input="x")
    assert refused_endpoint.value.code == "unsupported_endpoint"


def test_their_load_is_read_from_their_metrics(cluster: LocalCluster) -> None:
    """llama-server's own metric names (workers/load.py), read with the key."""
    for i in range(4):
        _complete(cluster, f"count me {i}")
    wait_until(
        lambda: sum(w.load.generated_tokens for w in cluster.table().workers) >= 16,
        10 * HEARTBEAT_S,
        "the servers' generated tokens to reach the controller",
    )


def test_a_killed_server_leaves_the_table_and_comes_back_when_restarted(
    cluster: LocalCluster, servers: list[Server]
) -> None:
    victim, survivor = servers
    victim_worker, survivor_worker = _worker_of(cluster, victim), _worker_of(cluster, survivor)
    with Load(cluster.gateway_url, NAME, concurrency=2, max_tokens=4) as load:
        load.wait_requests(4)
        killed = time.monotonic()
        victim.kill()
        wait_until(
            lambda: victim_worker not in cluster.worker_ids(NAME), 30, "the dead server to leave"
        )
        print(f"out of the table {time.monotonic() - killed:.1f}s after the kill")  # ~1 heartbeat
        load.wait_requests(6)  # on the other replica
        # back: the same server on the same port, as its supervisor would restart it
        victim.start()
        wait_until(lambda: victim_worker in cluster.worker_ids(NAME), 30, "the server to return")
        load.wait_requests(6)
    result = load.result
    # requests under way on the killed server may fail; every other one was answered
    assert not result.failed_mid_stream or all("mid-stream" in e for e in result.failed_mid_stream)
    assert len(result.failed_before_first_chunk) == 0, result.failed_before_first_chunk
    assert result.workers.get(survivor_worker, 0) > 0
    # (the gateway may still cool down the worker that refused connections: a few seconds)
    wait_until(lambda: _complete(cluster) == victim_worker, 30, "a request to reach it again")
    # the worker took it out itself at its first failed check, not the controller's expiry
    log = next(c for c in cluster.components if c.name == f"worker-{NAME}-0").log()
    log += next(c for c in cluster.components if c.name == f"worker-{NAME}-1").log()
    assert "stopped answering" in log
    controller = cluster.controller.log() if cluster.controller else ""
    assert f"worker {victim_worker} deregistered" in controller
    assert not re.search(f"worker {victim_worker} expired", controller)


def test_the_key_is_in_no_log_response_or_table(cluster: LocalCluster) -> None:
    raw = cluster.client().completions.with_raw_response.create(
        model=NAME, prompt="x", max_tokens=2
    )
    assert SECRET not in raw.text and SECRET not in str(raw.headers)
    for text in (
        httpx.get(f"{cluster.controller_url}/workers", timeout=5).text,
        httpx.get(f"{cluster.gateway_url}/v1/models", timeout=5).text,
        httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text,
    ):
        assert SECRET not in text
    for component in cluster.components:
        assert SECRET not in component.log(), component.name
