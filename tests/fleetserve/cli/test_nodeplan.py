"""Which node of `up --nodes` starts which replicas, and on which GPUs (pure decisions)."""

from __future__ import annotations

import pytest

from fleetserve.cli.cluster import ModelSpec
from fleetserve.cli.nodeplan import Stage, share_nodes
from fleetserve.cli.placing import _check_gpus
from fleetserve.errors import ConfigError
from workers.placement import Gpu, Machine

NODES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]


def _spec(name: str, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, **fields})


def _on_gpus(spec: ModelSpec) -> bool:
    return spec.engine in (None, "vllm")  # vLLM is the default engine


def test_gpu_replicas_fill_nodes_in_order_and_spanning_ones_take_whole_nodes_first() -> None:
    models = [
        _spec("small", tensor_parallel_size=3, replicas=3),
        _spec("big", tensor_parallel_size=8, pipeline_parallel_size=2, nodes=2),
    ]
    shares = share_nodes(models, NODES, 8, _on_gpus)
    spanning = ("10.0.0.1", "10.0.0.2")  # the head holds the first rank of the big replica
    assert [s.stages for s in shares[:2]] == [
        [Stage("big", 0, spanning, 0)],
        [Stage("big", 0, spanning, 1)],
    ]
    # first fit by free GPUs: two replicas of 3 GPUs on the third node, the next on the fourth
    assert [s.replicas for s in shares] == [{}, {}, {"small": 2}, {"small": 1}]
    assert [s.gpus_used for s in shares] == [0, 0, 6, 3]


def test_replicas_without_gpus_spread_and_attached_servers_stay_on_the_head() -> None:
    models = [
        _spec("echo", engine="fake", replicas=3),
        _spec("ext", engine="openai", url=["http://a/v1", "http://b/v1"]),
    ]
    shares = share_nodes(models, NODES[:2], 0, _on_gpus)
    assert [s.replicas for s in shares] == [{"echo": 2, "ext": 2}, {"echo": 1}]


@pytest.mark.parametrize(
    ("models", "gpus", "message"),
    [
        ([_spec("m", tensor_parallel_size=8, replicas=9)], 8, "needs 72 GPUs (m: 9 x 8)"),
        ([_spec("m", tensor_parallel_size=16)], 8, "spread its pipeline stages over nodes"),
        (
            [_spec("m", tensor_parallel_size=8, pipeline_parallel_size=2, nodes=2, replicas=3)],
            8,
            "replica 3 of 3 spans 2 nodes, but only 0 of the 4 nodes are left",
        ),
        (
            [_spec("m", tensor_parallel_size=8, pipeline_parallel_size=2, nodes=2)],
            4,
            "each of its 2 nodes would hold 8 ranks but a node has 4 GPUs",
        ),
    ],
)
def test_a_file_too_big_for_the_nodes_is_refused_saying_why(
    models: list[ModelSpec], gpus: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        share_nodes(models, NODES, gpus, _on_gpus)


def test_up_runs_a_model_that_names_its_gpus_only_where_every_gpu_qualifies() -> None:
    """`gpu:` on one machine (NVML's names, spaces read as dashes; memory as NVML counts it:
    an 80 GB H100 has 79.6 GiB)."""
    h100 = Gpu(0, 81559 * 2**20, "NVIDIA H100 80GB HBM3")
    l4 = Gpu(1, 23034 * 2**20, "NVIDIA L4")
    spec = _spec("m", gpu={"products": ["NVIDIA-H100-80GB-HBM3"], "min_memory_gib": 79})
    _check_gpus([spec], Machine(gpus=(h100,)))
    with pytest.raises(ConfigError, match=r"model m asks for NVIDIA-H100-80GB-HBM3 with 79 GiB"):
        _check_gpus([spec], Machine(gpus=(h100, l4)))
    with pytest.raises(ConfigError, match="this machine has no GPU"):
        _check_gpus([spec], Machine())
    too_much = _spec("m", gpu={"min_memory_gib": 80})  # the H100's 79.6 GiB is not 80
    with pytest.raises(ConfigError, match="asks for any GPU with 80 GiB or more"):
        _check_gpus([too_much], Machine(gpus=(h100,)))
    _check_gpus([_spec("f", engine="fake", gpu={"products": ["X"]})], Machine())  # no GPU used
