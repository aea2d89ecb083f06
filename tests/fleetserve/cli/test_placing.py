"""On-demand models that take turns (fleetserve/cli/placing.py) on described machines: GPUs
described as NVML would, cores as the CPU twin; no hardware, no process."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from controller.protocol import DeclaredModel, ModelState
from fleetserve.cli.cluster import ModelSpec
from fleetserve.cli.placing import plan_turns
from fleetserve.cli.status import models_table
from fleetserve.cli.up import OnDemandReplicas
from fleetserve.protocol import ModelView, RouteTable, WorkerLoad, WorkerState, WorkerView
from workers.placement import Gpu, Machine, PlacementError, ReplicaNeed
from workers.settings import Device, WorkerSettings

GIB = 2**30
EIGHT_GPUS = Machine(gpus=tuple(Gpu(i, 80 * GIB, "H100") for i in range(8)), cpu_cores=(0, 1))


def test_models_that_fit_together_need_no_turns() -> None:
    needs = [ReplicaNeed("a", tensor_parallel_size=4), ReplicaNeed("b", tensor_parallel_size=4)]
    plans, room = plan_turns(needs, EIGHT_GPUS, Device.AUTO, {"a", "b"})
    assert room is None
    assert [p.gpu_ids for p in plans] == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_on_demand_models_share_the_gpus_the_always_on_ones_leave() -> None:
    needs = [
        ReplicaNeed("always", tensor_parallel_size=2),
        ReplicaNeed("big", tensor_parallel_size=4),
        ReplicaNeed("small", replicas=2, tensor_parallel_size=2),
        ReplicaNeed("fake", uses_accelerator=False),
    ]
    plans, room = plan_turns(needs, EIGHT_GPUS, Device.AUTO, {"big", "small", "fake"})
    assert room is not None
    assert [(p.model, p.gpu_ids) for p in plans if p.model == "always"] == [("always", (0, 1))]
    assert (room.capacity, room.units("big"), room.units("small"), room.units("fake")) == (
        6,
        4,
        4,
        0,
    )
    # big runs on 2-5; small, while big holds them, has no room; alone it takes 2-5 too
    big, taken = room.plans("big", set())
    assert ([p.gpu_ids for p in big], taken) == ([(2, 3, 4, 5)], {2, 3, 4, 5})
    with pytest.raises(PlacementError):
        room.plans("small", taken)
    small, _ = room.plans("small", set())
    assert [p.environment() for p in small] == [
        {"CUDA_VISIBLE_DEVICES": "2,3"},
        {"CUDA_VISIBLE_DEVICES": "4,5"},
    ]


def test_on_the_cpu_each_rank_takes_a_core_of_its_own() -> None:
    """vLLM's CPU build: two TP=2 models on 2 cores take turns, each bound to both cores."""
    needs = [ReplicaNeed("a", tensor_parallel_size=2), ReplicaNeed("b", tensor_parallel_size=2)]
    machine = Machine(cpu_cores=(0, 1))
    plans, room = plan_turns(needs, machine, Device.CPU, {"a", "b"})
    assert room is not None and room.capacity == 2
    assert [p.environment() for p in plans] == [{"VLLM_CPU_OMP_THREADS_BIND": "0|1"}] * 2
    _, taken = room.plans("a", set())
    with pytest.raises(PlacementError, match="model b needs 2 cores, 0 of 2 are free"):
        room.plans("b", taken)
    # always-on models are refused as before when they alone do not fit
    with pytest.raises(PlacementError, match="tensor-parallel rank needs a core of its own"):
        plan_turns(needs, machine, Device.CPU, set())


def test_a_model_that_does_not_fit_even_alone_is_refused_before_anything_starts() -> None:
    needs = [
        ReplicaNeed("always", tensor_parallel_size=4),
        ReplicaNeed("a", tensor_parallel_size=8),
    ]
    with pytest.raises(PlacementError, match="a does not fit even alone beside the always-on"):
        plan_turns(needs, EIGHT_GPUS, Device.AUTO, {"a"})


class _Cluster:
    """What `up`'s OnDemandReplicas calls on its Cluster, recorded (no process: the real
    starts and stops are test_up.py's); the controller's demand is set by the test."""

    def __init__(self) -> None:
        self.demand: dict[str, float] = {}
        self.calls: list[tuple[str, str, str]] = []  # (action, model, its environment)

    def models(self) -> list[ModelState]:
        return [
            ModelState(name=n, declared=True, replicas=0, ready=0, state="x", demand_age_s=0)
            for n in self.demand
        ]

    def declare(self, model: DeclaredModel) -> None:
        self.calls.append(("declare", model.name, model.note))

    def add_replica(self, settings: WorkerSettings, name: str, env: dict[str, str]) -> str:
        self.calls.append(("start", settings.served_name or "", env["VLLM_CPU_OMP_THREADS_BIND"]))
        return name

    def stop_workers(self, workers: list[str]) -> None:
        self.calls.extend(("stop", worker, "") for worker in workers)


def test_up_stops_the_idle_model_before_it_starts_the_next_on_its_cores() -> None:
    """Two TP=2 vLLM-CPU models on 2 cores: each request for the other one swaps them."""
    needs = [ReplicaNeed("a", tensor_parallel_size=2), ReplicaNeed("b", tensor_parallel_size=2)]
    _, room = plan_turns(needs, Machine(cpu_cores=(0, 1)), Device.CPU, {"a", "b"})
    specs = {n: ModelSpec(name=n, engine="fake", load="on_demand") for n in ("a", "b")}
    cluster = _Cluster()
    replicas = OnDemandReplicas(cluster, Console(file=io.StringIO()), specs, {}, room)  # type: ignore[arg-type]
    for name in specs:
        replicas.replicas[name].append((WorkerSettings(served_name=name), f"worker-{name}", {}))
    empty = RouteTable(epoch="e", version=1, workers=[])
    cluster.demand = {"a": 0}
    replicas.tick(empty)
    assert [c for c in cluster.calls if c[0] != "declare"] == [("start", "a", "0|1")]
    cluster.calls.clear()
    cluster.demand = {"b": 0}  # a is loading: b waits, and its held requests learn why
    replicas.tick(empty)
    assert cluster.calls == [("declare", "b", "waiting for room: a in use")]
    cluster.calls.clear()
    a_ready = WorkerView(
        worker_id="wa",
        model_names=["a"],
        base_url="http://h:1/v1",
        engine="fake",
        capacity=8,
        state=WorkerState.READY,
        load=WorkerLoad(),
        last_heartbeat_age_s=0,
    )
    replicas.tick(RouteTable(epoch="e", version=2, workers=[a_ready]))  # ready and idle
    assert [c for c in cluster.calls if c[0] != "declare"] == [
        ("stop", "worker-a", ""),
        ("start", "b", "0|1"),  # on the cores a gave back
    ]
    assert list(replicas.running) == ["b"]


def test_status_says_why_a_model_waits() -> None:
    waiting = ModelView(name="b", declared=True, note="waiting for room: a in use")
    table = RouteTable(epoch="e", version=1, workers=[], models=[waiting])
    out = io.StringIO()
    Console(file=out, width=200).print(models_table(table, {}))
    assert "scaled_to_zero: waiting for room: a in use" in out.getvalue()
