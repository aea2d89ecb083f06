"""Where `fleetserve up`'s replicas run on this machine, on-demand models that take turns included.

Every replica is placed before anything starts (workers/placement.py). On-demand models that
do not fit beside the rest (GPUs on a GPU machine; on vLLM's CPU build, a core per rank) take
turns instead: the always-on replicas are placed first, each on-demand model must fit alone
in what they leave (the `Room`), and a model takes units of it when it starts: which idle
model makes room is fleetserve/cli/ondemand.py's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fleetserve.cli.cluster import Load, ModelSpec
from fleetserve.errors import ConfigError
from workers.engines import Engine
from workers.inventory import discover_machine, read_model_facts
from workers.placement import (
    Machine,
    ModelFacts,
    PlacementError,
    ReplicaNeed,
    ReplicaPlan,
    plan_placement,
    resolve_device,
)
from workers.settings import Device


def _check_gpus(specs: list[ModelSpec], machine: Machine) -> None:
    """A model that names its GPUs runs on a machine whose GPUs are all of them (placement
    does not tell GPU models apart: CUDA_VISIBLE_DEVICES narrows a mixed machine down)."""
    for spec in specs:
        if spec.gpu is None or not Engine.named(spec.engine).uses_accelerator:
            continue
        wrong = [g for g in machine.gpus if not spec.gpu.matches(g.name, g.memory_bytes)]
        if wrong or not machine.gpus:
            wanted = " or ".join(spec.gpu.products) or "any GPU"
            memory = (
                f" with {spec.gpu.min_memory_gib:g} GiB or more" if spec.gpu.min_memory_gib else ""
            )
            raise ConfigError(
                f"model {spec.name} asks for {wanted}{memory} (gpu); this machine has "
                f"{machine.describe()}"
            )


@dataclass(frozen=True)
class Room:
    """What on-demand models that do not fit together share: GPUs (CUDA) or cores (CPU, one
    per rank), identified by their index; the always-on replicas' are not in it."""

    device: Device
    machine: Machine  # the GPUs (not busy) or cores left to on-demand models
    needs: dict[str, ReplicaNeed]  # the on-demand models that take units of it

    @property
    def capacity(self) -> int:
        return len(_units(self.machine, self.device))

    def units(self, model: str) -> int:
        need = self.needs[model]
        return need.replicas * need.ranks if need.uses_accelerator else 0

    def plans(self, model: str, taken: set[int]) -> tuple[list[ReplicaPlan], set[int]]:
        """Where ``model``'s replicas run beside the running ones (which hold ``taken``), and
        the units they take; PlacementError if they do not fit."""
        need = self.needs[model]
        if not need.uses_accelerator:
            return [ReplicaPlan(model, r, None) for r in range(need.replicas)], set()
        if self.device is Device.CUDA:
            gpus = tuple(replace(g, busy=g.busy or g.index in taken) for g in self.machine.gpus)
            plans = plan_placement([need], replace(self.machine, gpus=gpus), Device.CUDA)
            return plans, {i for plan in plans for i in plan.gpu_ids}
        free = [c for c in self.machine.cpu_cores if c not in taken]
        if need.replicas * need.ranks > len(free):
            raise PlacementError(
                f"model {model} needs {need.replicas * need.ranks} cores, "
                f"{len(free)} of {self.capacity} are free"
            )
        plans = []
        for r in range(need.replicas):
            ranks, free = free[: need.ranks], free[need.ranks :]
            plans.append(ReplicaPlan(model, r, Device.CPU, cpu_bind="|".join(map(str, ranks))))
        return plans, {int(c) for plan in plans for c in str(plan.cpu_bind).split("|")}


def _units(machine: Machine, device: Device) -> list[int]:
    if device is Device.CUDA:
        return [g.index for g in machine.gpus if not g.busy]
    return list(machine.cpu_cores)


def place_cluster(
    specs: list[ModelSpec], device: Device
) -> tuple[list[tuple[ModelSpec, ReplicaPlan]], Room | None]:
    """Every replica to start, with where it runs; PlacementError if the machine is too small.

    The Room is None when everything fits together; else on-demand replicas are placed where
    they would run alone, and take their units from the Room when they start.
    """
    machine = discover_machine()
    _check_gpus(specs, machine)
    needs = []
    for spec in specs:
        uses_accelerator = Engine.named(spec.engine).uses_accelerator
        read = uses_accelerator and (machine.gpus or Path(spec.source).is_dir())
        needs.append(
            ReplicaNeed(
                spec.name,
                replicas=spec.replicas,
                tensor_parallel_size=spec.tensor_parallel_size,
                pipeline_parallel_size=spec.pipeline_parallel_size,
                uses_accelerator=uses_accelerator,
                facts=read_model_facts(spec.source) if read else ModelFacts(),
            )
        )
    plans, room = plan_turns(
        needs, machine, device, {s.name for s in specs if s.load is Load.ON_DEMAND}
    )
    by_name = {spec.name: spec for spec in specs}
    for plan in plans:
        spec = by_name[plan.model]
        Engine.named(spec.engine).check_device(plan.device)
        if spec.sleep_after_s is not None:
            Engine.named(spec.engine).check_sleep_mode(plan.device)
    return [(by_name[plan.model], plan) for plan in plans], room


def plan_turns(
    needs: list[ReplicaNeed], machine: Machine, device: Device, turns: set[str]
) -> tuple[list[ReplicaPlan], Room | None]:
    """Plans for every replica (placement's), and the Room if the models named in ``turns``
    (on demand) take turns: they do not all fit beside the rest."""
    device = resolve_device(device, machine, needs)
    units = _units(machine, device)
    asked = sum(n.replicas * n.ranks for n in needs if n.uses_accelerator)
    room = None
    if asked <= len(units) or not any(n.uses_accelerator for n in needs if n.model in turns):
        plans = plan_placement(needs, machine, device)
    else:
        always = [n for n in needs if n.model not in turns and n.uses_accelerator]
        kept = sum(n.replicas * n.ranks for n in always)
        if device is Device.CUDA:
            plans = plan_placement(always, machine, device) if always else []
            held = {i for plan in plans for i in plan.gpu_ids}
            busy = tuple(replace(g, busy=g.busy or g.index in held) for g in machine.gpus)
            left = replace(machine, gpus=busy)  # (positions kept: the distances index them)
        else:  # the always-on replicas' cores first (placement binds them among themselves)
            plans = plan_placement(always, replace(machine, cpu_cores=tuple(units[:kept])), device)
            left = replace(machine, cpu_cores=tuple(units[kept:]))
        room = Room(device, left, {n.model: n for n in needs if n.model in turns})
        plans += [
            ReplicaPlan(n.model, r, None)
            for n in needs
            if n not in always and n.model not in turns
            for r in range(n.replicas)
        ]
        for name in room.needs:
            try:
                plans += room.plans(name, set())[0]
            except PlacementError as exc:
                raise PlacementError(
                    f"on-demand models take turns when they do not fit together, but {name} "
                    f"does not fit even alone beside the always-on models: {exc}"
                ) from exc
    return plans, room
