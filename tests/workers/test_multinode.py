"""A replica spanning two nodes: rank 0 starts a Ray head, rank 1 joins, then rank 0 serves.

Two "nodes" on loopback (127.0.0.1 and 127.0.0.2) form a real Ray cluster.
The engine is the fake one: vLLM's CPU build refuses the Ray executor
("current platform cpu does not support ray"), so the vLLM side of a
multi-node replica (pipeline stages as Ray actors over NCCL) needs GPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleetserve import procs
from tests.conftest import module_log_dir
from tests.helpers import (
    SKYPILOT_RAY_PORTS,
    LocalCluster,
    alive,
    descendants,
    ports_taken,
    ray_dashboard,
    ray_head_port,
    wait_until,
)

pytestmark = pytest.mark.ray

NODES = "127.0.0.1,127.0.0.2"


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str]) -> Iterator[LocalCluster]:
    c = LocalCluster(module_log_dir("test_multinode"), fleet_env)
    yield c
    c.close()


def ray_nodes_alive(dashboard: str) -> int:
    try:
        nodes = httpx.get(f"{dashboard}/api/v0/nodes", timeout=5).json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0
    return sum(n["state"] == "ALIVE" for n in nodes)


def test_a_replica_on_two_nodes_serves_once_both_joined(cluster: LocalCluster) -> None:
    """With the ports SkyPilot's own Ray holds on its nodes taken (6380 among them: the
    dashboard of a head on the default 6379 once went there and failed to bind)."""
    ray_port = ray_head_port()
    flags = ["--nodes", NODES, "--ray-port", str(ray_port)]
    with ports_taken(*SKYPILOT_RAY_PORTS, ray_port + 1):
        head = cluster.add_worker("spanning", "fake", *flags, "--node-rank", "0")
        wait_until(
            lambda: "waiting for nodes to join the Ray cluster: 1/2" in head.log(),
            90,
            "Ray head up",
        )
        assert not cluster.worker_ids("spanning")  # not served before every stage has its node

        follower = cluster.add_worker("spanning", "fake", *flags, "--node-rank", "1")
        (worker_id,) = cluster.wait_workers("spanning", 1, timeout_s=120)
    assert ray_nodes_alive(ray_dashboard(head.log())) == 2
    view = next(w for w in cluster.table().workers if w.worker_id == worker_id)
    assert (view.nodes, view.pipeline_parallel_size) == (2, 2)

    reply = cluster.client().chat.completions.create(
        model="spanning", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content

    tree = [pid for c in (head, follower) for pid in (c.pid, *descendants(c.pid))]
    for component in (head, follower):  # SIGTERM: drain, deregister, then Ray goes down too
        assert procs.stop(component.proc, 60) == 0
    wait_until(lambda: not [pid for pid in tree if alive(pid)], 30, "no Ray process left")
    assert not cluster.worker_ids("spanning")


@pytest.mark.gpu(2)
def test_vllm_pipeline_stages_on_two_ray_nodes_answer_like_one_gpu(
    cluster: LocalCluster, tiny_model: Path
) -> None:
    """Two "nodes" of one GPU each on this machine: vLLM's Ray executor, PP=2, over NCCL."""
    ray_port = ray_head_port()
    flags = ["--source", str(tiny_model), "--nodes", NODES, "--ray-port", str(ray_port)]
    share = ("--gpu-memory-utilization", "0.4")  # pp1 and rank 0 of pp2 share GPU 0
    for rank in (0, 1):
        env = {"CUDA_VISIBLE_DEVICES": str(rank)}
        rank_flags = (*flags, "--node-rank", str(rank))
        cluster.add_worker("pp2", "vllm", *rank_flags, engine_args=share, env=env)
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    cluster.add_worker("pp1", "vllm", "--source", str(tiny_model), engine_args=share, env=env)
    cluster.wait_workers("pp2", 1, timeout_s=600)
    cluster.wait_workers("pp1", 1, timeout_s=600)
    client = cluster.client()

    def answer(model: str) -> str:
        reply = client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=16, temperature=0
        )
        return reply.choices[0].text

    assert answer("pp2") == answer("pp1")
