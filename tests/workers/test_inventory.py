"""What placement is fed: a local model's shape, the GPUs CUDA_VISIBLE_DEVICES lets us use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers.inventory import _visible, discover_machine, read_model_facts


def test_a_local_model_directory_gives_heads_and_weight_size(tiny_model: Path) -> None:
    facts = read_model_facts(str(tiny_model))
    assert (facts.num_attention_heads, facts.num_key_value_heads) == (4, 2)
    weights = sum(p.stat().st_size for p in tiny_model.glob("*.safetensors"))
    assert facts.weight_bytes == weights > 0


def test_an_unreadable_source_places_unchecked(tmp_path: Path) -> None:
    assert read_model_facts(str(tmp_path)).num_attention_heads is None  # no config.json


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, [0, 1, 2, 3]), ("2,0", [2, 0]), ("GPU-b", [1]), ("", []), ("7", [])],
)
def test_cuda_visible_devices_picks_gpus_by_index_or_uuid(
    spec: str | None, expected: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    assert _visible([0, 1, 2, 3], ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]) == expected


def test_this_machine_is_described() -> None:
    machine = discover_machine()
    assert machine.cpu_cores  # the cores this process may use
    assert all(g.memory_bytes > 0 for g in machine.gpus)


def test_a_worker_that_cannot_be_placed_says_why_and_starts_nothing(
    fleet_env: dict[str, str], tiny_model: Path
) -> None:
    if discover_machine().gpus:
        pytest.skip("this machine has GPUs")
    worker = ["worker", "--served-name", "t", "--source", str(tiny_model)]
    done = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", *worker, "--tensor-parallel-size", "2"],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "no GPU, and t asks for tensor_parallel_size 2" in done.stderr
    assert "starting vllm engine" not in done.stderr
