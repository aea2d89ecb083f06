"""Tensor parallel replicas give the same greedy answers as one-rank ones (vLLM's TP check).

On this machine the ranks are vLLM CPU workers bound to a core each
(`--device cpu`); the `gpu` tests run the same comparison on real GPUs over
NCCL, and are skipped where NVML sees fewer GPUs than they need.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import module_log_dir
from tests.helpers import RunningUp, running_up

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def greedy_answers(up: RunningUp, model: str) -> list[str]:
    client = up.client()
    return [
        client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    ]


def serve_and_answer(
    args: list[str], env: dict[str, str], name: str, model: str
) -> tuple[list[str], str]:
    log_dir = module_log_dir(f"test_tensor_parallel/{name}")
    with running_up(args, env, log_dir, timeout_s=300) as up:
        answers = greedy_answers(up, model)
        table = up.text()
    return answers, table


@pytest.mark.vllm
def test_tp2_on_cpu_answers_like_tp1(fleet_env: dict[str, str], tiny_model: Path) -> None:
    tp2, out = serve_and_answer(
        ["-f", str(EXAMPLES / "tensor-parallel.yaml"), "--device", "cpu"],
        fleet_env,
        "tp2",
        "tiny-llama-tp2",
    )
    assert "worker-tiny-llama-tp2-0: cpu 0|1" in out  # one core per rank
    assert "│ 2 x 1   │ cpu" in out  # the status table shows the TP size
    tp1, _ = serve_and_answer(
        ["--source", str(tiny_model), "--name", "tiny-llama", "--device", "cpu"],
        fleet_env,
        "tp1",
        "tiny-llama",
    )
    assert all(tp1), tp1
    assert tp2 == tp1


@pytest.mark.gpu(2)
def test_tp2_on_two_gpus_answers_like_tp1(fleet_env: dict[str, str], tiny_model: Path) -> None:
    tp2, out = serve_and_answer(
        ["--source", str(tiny_model), "--name", "t", "--tensor-parallel-size", "2"],
        fleet_env,
        "gpu-tp2",
        "t",
    )
    assert "worker-t-0: cuda 0,1" in out
    tp1, _ = serve_and_answer(
        ["--source", str(tiny_model), "--name", "t", "--replicas", "1"], fleet_env, "gpu-tp1", "t"
    )
    assert tp2 == tp1


@pytest.mark.gpu(2)
def test_two_replicas_get_one_gpu_each_and_answer_alike(
    fleet_env: dict[str, str], tiny_model: Path
) -> None:
    log_dir = module_log_dir("test_tensor_parallel/gpu-2x1")
    with running_up(["--source", str(tiny_model), "--name", "t"], fleet_env, log_dir, 300) as up:
        out = up.text()
        assert "worker-t-0: cuda 0" in out and "worker-t-1: cuda 1" in out
        answers = [greedy_answers(up, "t") for _ in range(4)]  # least-load spreads them
    assert all(a == answers[0] for a in answers)
