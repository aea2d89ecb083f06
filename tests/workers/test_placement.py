"""Placement decisions over described machines: no hardware needed."""

from __future__ import annotations

import pytest

from workers.placement import (
    Gpu,
    Machine,
    ModelFacts,
    PlacementError,
    ReplicaNeed,
    cpu_thread_binds,
    plan_placement,
    valid_tensor_parallel_sizes,
)
from workers.settings import Device

GIB = 2**30
LLAMA_8B = ModelFacts(num_attention_heads=32, num_key_value_heads=8, weight_bytes=16 * GIB)
LLAMA_70B = ModelFacts(num_attention_heads=64, num_key_value_heads=8, weight_bytes=140 * GIB)


def machine(count: int, gib: int = 80, name: str = "H100", distance=None) -> Machine:
    gpus = tuple(Gpu(i, gib * GIB, name) for i in range(count))
    return Machine(gpus=gpus, cpu_cores=tuple(range(16)), distance=distance)


def two_nvlink_islands() -> tuple[tuple[int, ...], ...]:
    """8 GPUs: 0-3 and 4-7 joined by NVLink (0), across the islands a host bridge (31)."""
    return tuple(tuple(0 if a // 4 == b // 4 else 31 for b in range(8)) for a in range(8))


def gpus_of(plans) -> list[tuple[int, ...]]:
    return [p.gpu_ids for p in plans]


def test_replicas_get_disjoint_gpus_and_their_environment() -> None:
    plans = plan_placement(
        [ReplicaNeed("llama-8b", replicas=2, tensor_parallel_size=4, facts=LLAMA_8B)],
        machine(8),
        Device.AUTO,
    )
    assert gpus_of(plans) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [p.environment() for p in plans] == [
        {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
        {"CUDA_VISIBLE_DEVICES": "4,5,6,7"},
    ]


def test_a_replica_is_packed_on_gpus_that_share_nvlink() -> None:
    # One TP=2 and one TP=4 replica: the TP=4 one gets a whole island, the TP=2 one
    # two GPUs of the other island, never one GPU on each side of the host bridge.
    plans = plan_placement(
        [
            ReplicaNeed("small", tensor_parallel_size=2, facts=LLAMA_8B),
            ReplicaNeed("big", tensor_parallel_size=4, facts=LLAMA_8B),
            ReplicaNeed("tiny", replicas=2, facts=LLAMA_8B),
        ],
        machine(8, distance=two_nvlink_islands()),
        Device.CUDA,
    )
    small, big, tiny_a, tiny_b = gpus_of(plans)
    assert big == (0, 1, 2, 3)
    assert {small[0] // 4, small[1] // 4} == {1}  # both on the second island
    assert len(set(small + big + tiny_a + tiny_b)) == 8


def test_visible_gpus_keep_their_physical_index() -> None:
    m = Machine(gpus=(Gpu(2, 24 * GIB), Gpu(5, 24 * GIB)), cpu_cores=(0,))
    (plan,) = plan_placement([ReplicaNeed("m", tensor_parallel_size=2)], m, Device.AUTO)
    assert plan.environment() == {"CUDA_VISIBLE_DEVICES": "2,5"}


def test_engines_without_accelerator_take_no_gpu() -> None:
    plans = plan_placement(
        [ReplicaNeed("fake", replicas=3, uses_accelerator=False), ReplicaNeed("m")],
        machine(1),
        Device.AUTO,
    )
    assert [(p.model, p.device, p.gpu_ids) for p in plans] == [
        ("fake", None, ()),
        ("fake", None, ()),
        ("fake", None, ()),
        ("m", Device.CUDA, (0,)),
    ]


def test_too_many_gpus_asked_says_what_fits() -> None:
    with pytest.raises(PlacementError) as error:
        plan_placement(
            [
                ReplicaNeed("llama-70b", replicas=2, tensor_parallel_size=4, facts=LLAMA_70B),
                ReplicaNeed("llama-8b", replicas=2, facts=LLAMA_8B),
            ],
            machine(8),
            Device.AUTO,
        )
    message = str(error.value)
    assert "needs 10 GPUs" in message and "8 GPUs (H100 80 GiB)" in message
    assert "llama-70b: 2 x 4 = 8" in message
    assert "what fits: llama-70b replicas: 1, llama-8b replicas: 2" in message


@pytest.mark.parametrize(
    ("count", "gib", "tp", "expected"),
    [
        (1, 80, 1, "does not fit on 1 GPU (H100 80 GiB) at any tensor_parallel_size"),
        (2, 80, 2, "leaves too little memory"),  # 70 GiB per 80 GiB GPU: no room for KV
        (4, 24, 4, "does not fit on 4 GPUs (H100 24 GiB) at any"),  # 35 GiB per 24 GiB GPU
    ],
)
def test_weights_that_do_not_fit_are_refused(count: int, gib: int, tp: int, expected: str) -> None:
    need = ReplicaNeed("llama-70b", tensor_parallel_size=tp, facts=LLAMA_70B)
    with pytest.raises(PlacementError, match="llama-70b") as error:
        plan_placement([need], machine(count, gib), Device.AUTO)
    assert expected in str(error.value)


def test_weights_that_fit_at_a_larger_tp_say_which() -> None:
    need = ReplicaNeed("llama-70b", tensor_parallel_size=2, facts=LLAMA_70B)
    with pytest.raises(PlacementError) as error:
        plan_placement([need], machine(8, 80), Device.AUTO)
    assert "it fits with tensor_parallel_size 4 or 8" in str(error.value)
    (plan,) = plan_placement(
        [ReplicaNeed("llama-70b", tensor_parallel_size=4, facts=LLAMA_70B)],
        machine(8, 80),
        Device.AUTO,
    )
    assert len(plan.gpu_ids) == 4


def test_tp_must_divide_the_attention_heads() -> None:
    qwen_like = ModelFacts(num_attention_heads=28, num_key_value_heads=4, weight_bytes=15 * GIB)
    with pytest.raises(PlacementError) as error:
        plan_placement(
            [ReplicaNeed("qwen", tensor_parallel_size=3, facts=qwen_like)], machine(4), Device.AUTO
        )
    assert "tensor_parallel_size 3 does not divide its 28 attention heads" in str(error.value)
    assert "fits with tensor_parallel_size 1, 2 or 4" in str(error.value)
    assert valid_tensor_parallel_sizes(qwen_like, 8) == [1, 2, 4]  # 28 heads, 4 KV heads
    # fewer KV heads than ranks is fine when the ranks are a multiple of them (replicated)
    assert valid_tensor_parallel_sizes(ModelFacts(32, 2), 8) == [1, 2, 4, 8]


def test_unknown_model_facts_only_count_gpus() -> None:
    plans = plan_placement(
        [ReplicaNeed("hub/model", tensor_parallel_size=3)], machine(4, 16), Device.AUTO
    )
    assert gpus_of(plans) == [(0, 1, 2)]


def test_pipeline_parallel_needs_tp_times_pp_gpus() -> None:
    plans = plan_placement(
        [ReplicaNeed("m", tensor_parallel_size=2, pipeline_parallel_size=2, facts=LLAMA_8B)],
        machine(4),
        Device.AUTO,
    )
    assert gpus_of(plans) == [(0, 1, 2, 3)]


def test_no_gpu_runs_single_rank_models_on_the_cpu() -> None:
    cpu = Machine(cpu_cores=(0, 1))
    plans = plan_placement([ReplicaNeed("a"), ReplicaNeed("b")], cpu, Device.AUTO)
    assert [(p.device, p.environment()) for p in plans] == [
        (Device.CPU, {"VLLM_CPU_OMP_THREADS_BIND": "0"}),
        (Device.CPU, {"VLLM_CPU_OMP_THREADS_BIND": "1"}),
    ]


def test_no_gpu_refuses_tensor_parallel_unless_cpu_is_asked_for() -> None:
    cpu = Machine(cpu_cores=(0, 1))
    need = ReplicaNeed("tiny-llama", tensor_parallel_size=2)
    with pytest.raises(PlacementError) as error:
        plan_placement([need], cpu, Device.AUTO)
    assert "no GPU" in str(error.value) and "tiny-llama asks for tensor_parallel_size 2" in str(
        error.value
    )
    assert "--device cpu" in str(error.value)
    (plan,) = plan_placement([need], cpu, Device.CPU)
    assert plan.environment() == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank


def test_cuda_asked_without_gpu_is_refused() -> None:
    with pytest.raises(PlacementError, match="no GPU found"):
        plan_placement([ReplicaNeed("m")], Machine(cpu_cores=(0,)), Device.CUDA)


def test_cpu_ranks_beyond_the_cores_are_refused() -> None:
    with pytest.raises(PlacementError, match="4 ranks but this process may use 2 cores"):
        plan_placement(
            [ReplicaNeed("m", replicas=2, tensor_parallel_size=2)],
            Machine(cpu_cores=(0, 1)),
            Device.CPU,
        )


def test_cpu_replicas_get_disjoint_cores() -> None:
    assert cpu_thread_binds([1, 1], [0, 1]) == ["0", "1"]
    assert cpu_thread_binds([1, 1], [0, 1, 2, 3, 4]) == ["0,1", "2,3"]
    assert cpu_thread_binds([2], [0, 1, 2, 3]) == ["0,1|2,3"]  # one range per TP rank
    assert cpu_thread_binds([1], [0, 1]) == [None]  # one engine: vLLM's own choice
    assert cpu_thread_binds([2, 1], [0, 1]) == [None, None]  # does not fit: leave it to vLLM


def test_cpu_tensor_parallel_must_divide_the_heads_too() -> None:
    tiny = ModelFacts(num_attention_heads=4, num_key_value_heads=2, weight_bytes=3_000_000)
    need = ReplicaNeed("tiny", tensor_parallel_size=3, facts=tiny)
    with pytest.raises(PlacementError, match="3 does not divide its 4 attention heads; use 1 or 2"):
        plan_placement([need], Machine(cpu_cores=(0, 1, 2)), Device.CPU)


def test_gpus_busy_with_other_processes_are_left_alone() -> None:
    gpus = tuple(Gpu(i, 80 * GIB, "H100", busy=i in (0, 2)) for i in range(4))
    m = Machine(gpus=gpus)
    (plan,) = plan_placement([ReplicaNeed("m", tensor_parallel_size=2)], m, Device.AUTO)
    assert plan.gpu_ids == (1, 3)
    with pytest.raises(PlacementError, match="4 GPUs \\(H100 80 GiB\\), 2 of them busy"):
        plan_placement([ReplicaNeed("m", tensor_parallel_size=4)], m, Device.AUTO)
