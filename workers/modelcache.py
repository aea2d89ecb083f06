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
from fleetserve.errors import ConfigError


@dataclass
class CachedModel:
    name: str
    format: str  # "gguf" or "hf"
    path: Path
    size_bytes: int
    quantization: str  # "q4_k_m", "f32", ... (GGUF file type; HF: the weights' dtype)
    served_by: list[str] = field(default_factory=list)  # worker URLs, when known


def gguf_file_type(path: Path) -> str:
    """The GGUF file's ``general.file_type`` as llama.cpp names it (``q4_k_m``)."""
    try:
        import gguf
    except ImportError:  # the llamacpp extra brings it
        return "unknown (needs the gguf package)"
    reader = gguf.GGUFReader(path)
    item = reader.get_field("general.file_type")
    if item is None:
        return "unknown"
    value = int(item.parts[item.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except ValueError:
        return f"type {value}"


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


def resolve_gguf(model: str, cache_dir: Path | None = None) -> Path:
    """The GGUF file meant by ``model``: a path, a directory with one .gguf, or a cache name."""
    if not model:
        raise ConfigError(
            "the llamacpp engines need --source: a .gguf file or a name from "
            "`fleetserve model list`"
        )
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if (path / "config.json").is_file():
            raise ConfigError(
                f"{path} is a Hugging Face model; make a GGUF file of it first: "
                f"fleetserve model convert {path} --to gguf"
            )
        raise ConfigError(f"{path} holds {len(files)} .gguf files; name one of them")
    cached = (cache_dir or paths.models_dir()) / f"{model}.gguf"
    if cached.is_file():
        return cached
    raise ConfigError(f"no GGUF model {model!r}: not a file, and not in `fleetserve model list`")
