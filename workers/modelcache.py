"""The model cache: what is on disk under ``$FLEETSERVE_HOME/models`` (`fleetserve model list`).

Two formats live there: Hugging Face directories (``config.json`` and weights,
what vLLM loads) and GGUF files (what llama.cpp loads), made by
`fleetserve model convert`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fleetserve import paths
from workers.llamacpp.convert import gguf_file_type


@dataclass
class CachedModel:
    name: str
    format: str  # "gguf" or "hf"
    path: Path
    size_bytes: int
    quantization: str  # "q4_k_m", "f32", ... (GGUF file type; HF: the weights' dtype)
    served_by: list[str] = field(default_factory=list)  # worker URLs, when known


def _directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models(cache_dir: Path | None = None) -> list[CachedModel]:
    """Every model in the cache, sorted by name."""
    root = cache_dir or paths.models_dir()
    found: list[CachedModel] = []
    if not root.is_dir():
        return found
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):  # a conversion or download under way
            continue
        if path.suffix == ".gguf" and path.is_file():
            size = path.stat().st_size
            found.append(CachedModel(path.stem, "gguf", path, size, gguf_file_type(path)))
        elif (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            dtype = str(config.get("torch_dtype") or config.get("dtype") or "unknown")
            size = _directory_size(path)
            found.append(CachedModel(path.name, "hf", path, size, dtype))
    return found
