"""The facts placement decides on: this machine's GPUs and cores, and a model's shape.

Reading hardware and files lives here; the decisions live in placement.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fleetserve import env
from workers.placement import Gpu, Machine, ModelFacts

logger = logging.getLogger(__name__)

# Hub lookups (sizes, config) are best effort: a slow or absent hub must not stall `up`.
_HUB_TIMEOUT_S = 10.0


def _visible(indices: list[int], uuids: list[str]) -> list[int]:
    """Positions allowed by CUDA_VISIBLE_DEVICES (indices or GPU UUIDs), in its order."""
    spec = env.cuda_visible_devices()
    if spec is None:
        return list(range(len(indices)))
    chosen = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.isdigit() and int(item) in indices:
            chosen.append(indices.index(int(item)))
        elif item in uuids:
            chosen.append(uuids.index(item))
    return chosen


def discover_machine() -> Machine:
    """GPUs through NVML (nvidia-ml-py), with their topology; cores this process may use."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library: a machine without NVIDIA GPUs
        logger.debug("no NVML: %s", exc)
        return Machine(cpu_cores=cores)
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        positions = _visible(list(range(len(handles))), uuids)
        handles = [handles[p] for p in positions]
        gpus = tuple(
            Gpu(
                index=p,
                memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                name=str(pynvml.nvmlDeviceGetName(h)),
                busy=_busy(pynvml, h),
            )
            for p, h in zip(positions, handles, strict=True)
        )
        return Machine(gpus=gpus, cpu_cores=cores, distance=_distances(pynvml, handles))
    finally:
        pynvml.nvmlShutdown()


def _busy(pynvml: Any, handle: Any) -> bool:
    try:
        return bool(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except pynvml.NVMLError:  # not supported (some vGPUs): assume free
        return False


def _distances(pynvml: Any, handles: list[Any]) -> tuple[tuple[int, ...], ...] | None:
    """0 for an NVLink pair, else 1 + NVML's topology level (same board 0 ... system 50)."""

    def between(a: Any, b: Any) -> int:
        if a is b:
            return 0
        status = pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
        if status == pynvml.NVML_P2P_STATUS_OK:
            return 0
        return 1 + int(pynvml.nvmlDeviceGetTopologyCommonAncestor(a, b))

    try:
        return tuple(tuple(between(a, b) for b in handles) for a in handles)
    except Exception as exc:  # topology queries are not supported everywhere (e.g. vGPUs)
        logger.debug("GPU topology unknown: %s", exc)
        return None


def _facts_from_config(config: dict[str, Any], weight_bytes: int | None) -> ModelFacts:
    config = config.get("text_config", config)  # multimodal models nest the language model
    heads = config.get("num_attention_heads")
    return ModelFacts(
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads", heads),
        weight_bytes=weight_bytes,
    )


def _weight_files(names: list[str]) -> list[str]:
    safetensors = [n for n in names if n.endswith(".safetensors")]
    return safetensors or [n for n in names if n.endswith((".bin", ".pt"))]


def read_model_facts(source: str) -> ModelFacts:
    """Heads and weight size of a local model directory, or of a hub model when reachable."""
    path = Path(source).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        files = _weight_files([p.name for p in path.iterdir()])
        return _facts_from_config(config, sum((path / f).stat().st_size for f in files) or None)
    try:
        from huggingface_hub import HfApi, hf_hub_download

        info = HfApi().model_info(source, files_metadata=True, timeout=_HUB_TIMEOUT_S)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        weight_bytes = sum(sizes[f] for f in _weight_files(list(sizes))) or None
        config = json.loads(Path(hf_hub_download(source, "config.json")).read_text())
        return _facts_from_config(config, weight_bytes)
    except Exception as exc:  # offline, gated, not a hub id: place without these checks
        logger.info("cannot read %s's size and heads (%s); placing it unchecked", source, exc)
        return ModelFacts()
