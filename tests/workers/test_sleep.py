"""vLLM's sleep mode, driven by the agent (workers/sleep.py).

The decisions with a hand-made clock; the whole way on real processes is
tests/workers/test_status_server.py (the fake engine, which serves vLLM's sleep routes: the
CPU build of vLLM refuses sleep mode); vLLM's own sleep mode on a GPU is the `gpu` test here,
skipped where NVML sees no GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetserve.errors import ConfigError
from fleetserve.protocol import WorkerLoad
from tests.conftest import module_log_dir
from tests.helpers import running_up, wait_until
from workers.engines import Engine
from workers.settings import Device
from workers.sleep import Sleeper, Step


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_idle_it_leaves_the_table_then_sleeps_once_nothing_runs_and_wakes_when_asked() -> None:
    clock = Clock()
    sleeper = Sleeper(10, clock)
    assert sleeper.step(WorkerLoad(generated_tokens=5), wake=False) is None
    clock.now = 9
    assert sleeper.step(WorkerLoad(generated_tokens=5), wake=False) is None
    clock.now = 12
    assert sleeper.step(WorkerLoad(generated_tokens=7), wake=False) is None  # used at 12
    clock.now = 22
    assert sleeper.step(WorkerLoad(generated_tokens=7), wake=False) is Step.LEAVE
    sleeper.done(Step.LEAVE)
    # a request that a gateway sent before it knew: the engine sleeps after it
    assert sleeper.step(WorkerLoad(running=1, generated_tokens=8), wake=False) is None
    assert sleeper.step(WorkerLoad(generated_tokens=9), wake=False) is Step.SLEEP
    sleeper.done(Step.SLEEP)
    assert sleeper.step(WorkerLoad(generated_tokens=9), wake=False) is None  # asleep
    assert sleeper.step(WorkerLoad(generated_tokens=9), wake=True) is Step.WAKE
    sleeper.woke(2.5)  # the engine is awake; its registration failed: asked again
    assert sleeper.step(WorkerLoad(generated_tokens=9), wake=True) is Step.WAKE
    assert not sleeper.asleep  # (so the agent only registers again)
    sleeper.done(Step.WAKE)
    assert (sleeper.sleeps, sleeper.wakes, sleeper.wake_seconds) == (1, 1, 2.5)
    clock.now = 31  # awake again: idle counts from the wake
    assert sleeper.step(WorkerLoad(generated_tokens=9), wake=False) is None


def test_sleep_mode_is_refused_where_it_cannot_work() -> None:
    """vLLM's CPU build refuses --enable-sleep-mode; engines without sleep mode, or not
    behind the relay that keeps their dev routes to the agent, are refused too."""
    with pytest.raises(ConfigError, match="CPU build refuses --enable-sleep-mode"):
        Engine.named("vllm").check_sleep_mode(Device.CPU)
    with pytest.raises(ConfigError, match="the llama-server engine has no sleep mode"):
        Engine.named("llama-server").check_sleep_mode(None)
    Engine.named("fake").check_sleep_mode(None)


@pytest.mark.gpu
@pytest.mark.vllm
def test_vllm_sleeps_frees_its_gpu_memory_and_wakes_to_the_same_answers(
    fleet_env: dict[str, str], tiny_model: Path
) -> None:
    """On a GPU (not run without one): the idle engine sleeps (level 1), its GPU memory goes,
    a request wakes it and gets the greedy answer it got before."""
    import pynvml

    log_dir = module_log_dir("test_sleep_gpu")
    cluster = log_dir / "cluster.yaml"
    cluster.write_text(
        f"models:\n  - {{name: tiny, engine: vllm, source: {tiny_model}, sleep_after_s: 5}}\n"
    )

    def used_gib() -> float:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**30
        finally:
            pynvml.nvmlShutdown()

    def slept() -> bool:
        return any("engine /sleep in" in p.read_text() for p in log_dir.glob("worker-*.log"))

    with running_up(["-f", str(cluster)], fleet_env, log_dir, 600) as up:
        client = up.client().with_options(timeout=300)

        def answer() -> str:
            reply = client.completions.create(
                model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0
            )
            return reply.choices[0].text

        before = answer()
        awake_gib = used_gib()
        wait_until(slept, 120, "the engine asleep")
        assert used_gib() < awake_gib / 2  # the KV cache and the weights left the GPU
        assert answer() == before  # held, woken, answered as before
        assert any("awake" in p.read_text() for p in log_dir.glob("worker-*.log"))
