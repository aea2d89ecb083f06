"""Where replicas run on one machine. Pure decisions, unit-tested without hardware.

`plan_placement` takes what the cluster asks for (`ReplicaNeed`) and what the
machine has (`Machine`, from workers/inventory.py on a real one) and returns one
`ReplicaPlan` per replica, or raises `PlacementError` saying what would fit.
The caller carries the plan out (the environment of each worker process).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from fleetserve import constants
from fleetserve.errors import ConfigError
from workers.settings import Device


class PlacementError(ConfigError):
    """The cluster does not fit this machine; the message says what would."""


@dataclass(frozen=True)
class Gpu:
    index: int  # the physical index, as CUDA_VISIBLE_DEVICES and nvidia-smi count
    memory_bytes: int
    name: str = "GPU"
    busy: bool = False  # another process computes on it already: placement leaves it alone


@dataclass(frozen=True)
class Machine:
    gpus: tuple[Gpu, ...] = ()
    cpu_cores: tuple[int, ...] = ()
    #: distance[a][b] between the a-th and b-th GPU of `gpus`: 0 NVLink, then PCIe
    #: switch < host bridge < across CPU sockets (NVML's topology levels). None: unknown.
    distance: tuple[tuple[int, ...], ...] | None = None

    def describe(self) -> str:
        if not self.gpus:
            return "no GPU"
        names = sorted({f"{g.name} {_gib(g.memory_bytes)}" for g in self.gpus})
        busy = sum(g.busy for g in self.gpus)
        also = f", {busy} of them busy with other processes" if busy else ""
        return f"{len(self.gpus)} GPU{'s' if len(self.gpus) > 1 else ''} ({', '.join(names)}){also}"


@dataclass(frozen=True)
class ModelFacts:
    """What placement needs to know of a model; None where it could not be read."""

    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    weight_bytes: int | None = None


@dataclass(frozen=True)
class ReplicaNeed:
    """One model of the cluster file, as placement sees it."""

    model: str
    replicas: int = 1
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    uses_accelerator: bool = True  # False for engines that need neither GPUs nor bound cores
    facts: ModelFacts = field(default_factory=ModelFacts)

    @property
    def ranks(self) -> int:
        """GPUs (or CPU workers) one replica needs on this machine."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class ReplicaPlan:
    model: str
    replica: int
    device: Device | None  # None: an engine without accelerator (e.g. fake)
    gpu_ids: tuple[int, ...] = ()
    cpu_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND; None: vLLM's own choice

    def environment(self) -> dict[str, str]:
        """What the worker process's environment must say to hold to this plan."""
        if self.device is Device.CUDA:
            return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpu_ids))}
        if self.cpu_bind is not None:
            return {"VLLM_CPU_OMP_THREADS_BIND": self.cpu_bind}
        return {}


def _gib(n: int) -> str:
    return f"{n / 2**30:.0f} GiB"


def _either(values: list[int]) -> str:
    """[1, 2, 4] -> '1, 2 or 4'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def resolve_device(requested: Device, machine: Machine, needs: list[ReplicaNeed]) -> Device:
    """``auto`` means the GPUs when there are some; without, only single-rank models run on CPU.

    A model with TP or PP > 1 was written for GPUs: running it on the CPU is slow
    enough that it must be asked for (``--device cpu``), not fallen into.
    """
    if requested is Device.CUDA and not machine.gpus:
        raise PlacementError(
            "--device cuda: no GPU found on this machine (NVML and torch see none). "
            "Run on vLLM's CPU build with --device cpu."
        )
    if requested is not Device.AUTO:
        return requested
    if machine.gpus:
        return Device.CUDA
    multi = [n for n in needs if n.uses_accelerator and n.ranks > 1]
    if multi:
        asked = "; ".join(
            f"{n.model} asks for tensor_parallel_size {n.tensor_parallel_size}"
            + (
                f" x pipeline_parallel_size {n.pipeline_parallel_size}"
                if n.pipeline_parallel_size > 1
                else ""
            )
            for n in multi
        )
        raise PlacementError(
            f"this machine has no GPU, and {asked}. To run on vLLM's CPU build anyway "
            "(one core per rank; slow, for trying things out), add --device cpu."
        )
    return Device.CPU


def valid_tensor_parallel_sizes(facts: ModelFacts, limit: int) -> list[int]:
    """TP sizes up to ``limit`` that split the model's attention heads evenly (vLLM's rule)."""
    return [tp for tp in range(1, limit + 1) if not _heads_problem(facts, tp)]


def _heads_problem(facts: ModelFacts, tp: int) -> str | None:
    heads, kv = facts.num_attention_heads, facts.num_key_value_heads
    if heads is not None and heads % tp:
        return f"tensor_parallel_size {tp} does not divide its {heads} attention heads"
    # vLLM splits KV heads across ranks, or replicates them when there are fewer than ranks.
    if kv is not None and kv % tp and tp % kv:
        return f"tensor_parallel_size {tp} neither divides nor is a multiple of its {kv} KV heads"
    return None


def _fits_memory(facts: ModelFacts, ranks: int, gpu_bytes: int) -> bool:
    if facts.weight_bytes is None:
        return True
    usable = gpu_bytes * constants.GPU_MEMORY_FRACTION * (1 - constants.KV_CACHE_MIN_FRACTION)
    return facts.weight_bytes / ranks <= usable


def _check_model(need: ReplicaNeed, machine: Machine) -> None:
    """Refuse a model that cannot run on these GPUs at its TP, saying which TP would."""
    tp = need.tensor_parallel_size
    smallest = min(g.memory_bytes for g in machine.gpus)
    sizes = valid_tensor_parallel_sizes(need.facts, len(machine.gpus))
    fitting = [
        t for t in sizes if _fits_memory(need.facts, t * need.pipeline_parallel_size, smallest)
    ]
    hint = (
        f"; on {machine.describe()} it fits with tensor_parallel_size {_either(fitting)}"
        if fitting
        else f"; it does not fit on {machine.describe()} at any tensor_parallel_size"
    )
    problem = _heads_problem(need.facts, tp)
    if problem:
        raise PlacementError(f"model {need.model}: {problem}{hint}")
    if not _fits_memory(need.facts, need.ranks, smallest):
        weights = need.facts.weight_bytes or 0
        raise PlacementError(
            f"model {need.model}: {_gib(weights)} of weights over {need.ranks} GPU(s) of "
            f"{_gib(smallest)} leaves too little memory for the KV cache{hint}"
        )


def _suggest_replicas(needs: list[ReplicaNeed], gpus: int) -> str:
    """Replica counts that fit, taking from the largest consumer first."""
    counts = {n.model: n.replicas for n in needs}
    per = {n.model: n.ranks for n in needs}
    while sum(counts[m] * per[m] for m in counts) > gpus:
        reducible = [m for m in counts if counts[m] > 1]
        if not reducible:
            total = sum(per.values())
            return f"even one replica of each model needs {total} GPUs"
        biggest = max(reducible, key=lambda m: counts[m] * per[m])
        counts[biggest] -= 1
    return "what fits: " + ", ".join(f"{m} replicas: {c}" for m, c in counts.items())


def _best_group(
    free: list[int], size: int, distance: tuple[tuple[int, ...], ...] | None
) -> list[int]:
    """The ``size`` free GPUs (positions in Machine.gpus) that are closest together."""
    if distance is None or math.comb(len(free), size) > constants.PLACEMENT_MAX_GROUPS:
        return free[:size]

    def spread(group: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
        pairs = [distance[a][b] for a, b in itertools.combinations(group, 2)]
        return (max(pairs, default=0), sum(pairs), group)

    best = min(itertools.combinations(free, size), key=spread)
    return list(best)


def _plan_gpus(needs: list[ReplicaNeed], machine: Machine) -> list[ReplicaPlan]:
    gpu_needs = [n for n in needs if n.uses_accelerator]
    for need in gpu_needs:
        _check_model(need, machine)
    free = [p for p, gpu in enumerate(machine.gpus) if not gpu.busy]
    total = sum(n.replicas * n.ranks for n in gpu_needs)
    if total > len(free):
        asked = ", ".join(
            f"{n.model}: {n.replicas} x {n.ranks} = {n.replicas * n.ranks}" for n in gpu_needs
        )
        raise PlacementError(
            f"the cluster needs {total} GPUs ({asked}) but this machine has "
            f"{machine.describe()}; {_suggest_replicas(gpu_needs, len(free))}"
        )
    # Widest replicas first, so a TP=4 group is not broken up by TP=1 replicas.
    order = sorted(
        ((n, r) for n in gpu_needs for r in range(n.replicas)), key=lambda nr: -nr[0].ranks
    )
    chosen: dict[tuple[str, int], tuple[int, ...]] = {}
    for need, replica in order:
        group = _best_group(free, need.ranks, machine.distance)
        free = [p for p in free if p not in group]
        chosen[(need.model, replica)] = tuple(machine.gpus[p].index for p in sorted(group))
    return [
        ReplicaPlan(n.model, r, Device.CUDA, gpu_ids=chosen[(n.model, r)])
        if n.uses_accelerator
        else ReplicaPlan(n.model, r, None)
        for n in needs
        for r in range(n.replicas)
    ]


def _plan_cpu(needs: list[ReplicaNeed], machine: Machine) -> list[ReplicaPlan]:
    cpu_needs = [n for n in needs if n.uses_accelerator]
    for need in cpu_needs:
        problem = _heads_problem(need.facts, need.tensor_parallel_size)
        if problem:
            sizes = _either(valid_tensor_parallel_sizes(need.facts, len(machine.cpu_cores)))
            raise PlacementError(f"model {need.model}: {problem}; use {sizes}")
    ranks = [n.ranks for n in cpu_needs for _ in range(n.replicas)]
    if sum(ranks) > len(machine.cpu_cores) and any(r > 1 for r in ranks):
        raise PlacementError(
            f"on the CPU every tensor-parallel rank needs a core of its own: the cluster has "
            f"{sum(ranks)} ranks but this process may use {len(machine.cpu_cores)} cores"
        )
    binds = iter(cpu_thread_binds(ranks, list(machine.cpu_cores)))
    return [
        ReplicaPlan(n.model, r, Device.CPU, cpu_bind=next(binds))
        if n.uses_accelerator
        else ReplicaPlan(n.model, r, None)
        for n in needs
        for r in range(n.replicas)
    ]


def plan_placement(needs: list[ReplicaNeed], machine: Machine, device: Device) -> list[ReplicaPlan]:
    """One plan per replica, in the order of ``needs``; PlacementError if it cannot fit."""
    device = resolve_device(device, machine, needs)
    return _plan_gpus(needs, machine) if device is Device.CUDA else _plan_cpu(needs, machine)


def cpu_thread_binds(tp_sizes: list[int], cores: list[int]) -> list[str | None]:
    """``VLLM_CPU_OMP_THREADS_BIND`` for each CPU replica: disjoint cores, ``|`` between TP ranks.

    Several vLLM CPU engines whose OpenMP threads share cores stall each other
    (a thread spins at a barrier while its peer is descheduled), so each rank
    gets cores of its own. None (vLLM's own "auto") where there is only one rank
    or fewer cores than ranks.
    """
    ranks = sum(tp_sizes)
    if ranks <= 1 or len(cores) < ranks:
        return [None] * len(tp_sizes)
    per_rank = len(cores) // ranks
    binds: list[str | None] = []
    next_core = 0
    for tp in tp_sizes:
        groups = []
        for _ in range(tp):
            groups.append(",".join(str(c) for c in cores[next_core : next_core + per_rank]))
            next_core += per_rank
        binds.append("|".join(groups))
    return binds
