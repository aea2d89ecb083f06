"""Which node of a multi-node cluster runs which replicas of a cluster file. Pure decisions.

SkyPilot's cluster.yaml runs `fleetserve up -f FILE --nodes IPS --node-rank R` on
every node; each node computes the same plan from the same file and node count and
starts its own share. Replicas spanning nodes (``nodes: N``) take N whole nodes each,
first in the node order, so the head (rank 0) holds the first of them when there are
any. Whole replicas then go where they fit: GPU replicas first-fit by free GPUs,
replicas without GPUs (the fake engine, vLLM's CPU build on GPU-less nodes) to the
node with the fewest replicas, so a CPU cluster spreads them. Attached servers (``url``)
are watched from the head, each replica from its own url in the file's order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve.cli.cluster import ModelSpec
from fleetserve.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    """This node's part of a replica spanning nodes: `fleetserve worker --nodes --node-rank`."""

    model: str
    replica: int
    nodes: tuple[str, ...]  # the replica's nodes, its Ray head first
    node_rank: int


@dataclass
class NodeShare:
    replicas: dict[str, int] = field(default_factory=dict)  # whole replicas, by model name
    stages: list[Stage] = field(default_factory=list)
    gpus_used: int = 0

    @property
    def count(self) -> int:
        return sum(self.replicas.values()) + len(self.stages)


def share_nodes(
    models: list[ModelSpec],
    nodes: list[str],
    gpus_per_node: int,
    uses_gpus: Callable[[ModelSpec], bool],
) -> list[NodeShare]:
    """One share per node (in ``nodes``' order); ConfigError when the file does not fit.

    ``uses_gpus(spec)``: whether a replica of ``spec`` takes GPUs (its engine is an
    accelerated one and the nodes have GPUs).
    """
    shares = [NodeShare() for _ in nodes]
    free = list(range(len(nodes)))  # nodes no spanning replica holds
    for spec in models:
        if spec.nodes == 1:
            continue
        per_node = spec.tensor_parallel_size * spec.pipeline_parallel_size // spec.nodes
        if gpus_per_node and uses_gpus(spec) and per_node > gpus_per_node:
            raise ConfigError(
                f"model {spec.name}: each of its {spec.nodes} nodes would hold {per_node} ranks "
                f"but a node has {gpus_per_node} GPUs"
            )
        for replica in range(spec.replicas):
            if len(free) < spec.nodes:
                raise ConfigError(
                    f"model {spec.name}: replica {replica + 1} of {spec.replicas} spans "
                    f"{spec.nodes} nodes, but only {len(free)} of the {len(nodes)} nodes are left"
                )
            group, free = free[: spec.nodes], free[spec.nodes :]
            ips = tuple(nodes[i] for i in group)
            for rank, i in enumerate(group):
                shares[i].stages.append(Stage(spec.name, replica, ips, rank))
    for spec in models:
        if spec.nodes > 1:
            continue
        ranks = spec.tensor_parallel_size * spec.pipeline_parallel_size
        on_gpus = gpus_per_node > 0 and uses_gpus(spec)
        if on_gpus and ranks > gpus_per_node:
            raise ConfigError(
                f"model {spec.name}: a replica needs {ranks} GPUs but a node has "
                f"{gpus_per_node}; spread its pipeline stages over nodes (nodes: N)"
            )
        for _ in range(spec.replicas):
            if spec.url:  # attached servers: watched from the head, replica i from url i
                target: int | None = 0
            elif on_gpus:
                fits = [i for i in free if gpus_per_node - shares[i].gpus_used >= ranks]
                target = fits[0] if fits else None
            else:
                target = min(free, key=lambda i: (shares[i].count, i)) if free else None
            if target is None:
                raise ConfigError(_too_small(models, len(nodes), gpus_per_node, uses_gpus))
            share = shares[target]
            share.replicas[spec.name] = share.replicas.get(spec.name, 0) + 1
            share.gpus_used += ranks if on_gpus else 0
    return shares


def _too_small(
    models: list[ModelSpec], nodes: int, gpus: int, uses_gpus: Callable[[ModelSpec], bool]
) -> str:
    parts = [
        f"{s.name}: {s.replicas} x {s.tensor_parallel_size * s.pipeline_parallel_size}"
        for s in models
        if uses_gpus(s)
    ]
    need = sum(
        s.replicas * s.tensor_parallel_size * s.pipeline_parallel_size
        for s in models
        if uses_gpus(s)
    )
    return (
        f"the cluster file needs {need} GPUs ({', '.join(parts)}) but the cluster has {nodes} "
        f"nodes of {gpus} GPUs (a replica never spans nodes unless its model says nodes: N)"
    )
