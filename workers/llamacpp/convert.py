"""`fleetserve model convert HF_DIR --to gguf`: llama.cpp's converter and quantizer, wrapped.

The converter (``convert_hf_to_gguf.py`` and its ``conversion`` package) ships
in the llama-cpp-python source archive, not in its wheel: the first conversion
fetches llama.cpp's sources (source.py). It writes f32, f16,
bf16 or q8_0 itself; other types (q4_k_m, ...) are made from its f32 output by
llama.cpp's quantizer. Both run as children (shim.py), their
progress read from their log lines.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fleetserve import paths
from fleetserve.errors import ConfigError
from workers.llamacpp.source import source_dir

#: Types the converter writes itself.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
#: Types llama.cpp's quantizer makes from an f32 file (llama.cpp's own names).
QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q5_k_m", "q6_k")
QUANT_TYPES = CONVERTER_TYPES + QUANTIZER_TYPES

# Lines of the children that mark one tensor done.
_CONVERTED = re.compile(r"^INFO:hf-to-gguf:(\S+),\s+torch\.")
_QUANTIZED = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")


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


def _tensor_count(hf_dir: Path) -> int | None:
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            total += len(list(f.keys()))
    return total


def _run_step(
    cmd: list[str],
    progress: Progress,
    description: str,
    pattern: re.Pattern[str],
    total: int | None,
) -> tuple[int, list[str]]:
    """Run a child, advancing a progress bar on each line matching ``pattern``."""
    task = progress.add_task(description, total=total)
    lines: list[str] = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        if line.startswith("WARNING:fleetserve"):  # what the shim changed: say so
            progress.console.print(line.rstrip().split(":", 2)[2])
        match = pattern.match(line)
        if match:
            if match.lastindex and match.lastindex >= 2:  # "[ i/ n]": the quantizer knows n
                progress.update(task, completed=int(match[1]), total=int(match[2]))
            else:
                progress.advance(task)
    code = proc.wait()
    if code == 0:
        done = max(progress.tasks[task].completed, 1)
        progress.update(task, total=done, completed=done)
    return code, lines


def _failure(step: str, code: int, lines: list[str]) -> ConfigError:
    why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    tail = "\n".join(lines[-15:])
    return ConfigError(f"{step} failed ({why}):\n{tail}")


def convert_to_gguf(
    hf_dir: Path,
    quantize: str = "f16",
    output: Path | None = None,
    pre_tokenizer: str | None = None,
    console: Console | None = None,
) -> Path:
    """Write ``hf_dir`` as a GGUF file of type ``quantize``; return its path.

    The default output is ``HF_DIR_NAME-QUANT.gguf`` in the model cache. The file
    appears only when complete (written under a hidden name, then renamed).
    """
    if quantize not in QUANT_TYPES:
        raise ConfigError(f"unknown type {quantize!r}; choose one of {', '.join(QUANT_TYPES)}")
    if not (hf_dir / "config.json").is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    output = output or paths.models_dir() / f"{hf_dir.name}-{quantize}.gguf"
    output.parent.mkdir(parents=True, exist_ok=True)
    source = source_dir()
    console = console or Console(stderr=True)
    first_type = quantize if quantize in CONVERTER_TYPES else "f32"
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".convert-") as tmp:
        converted = Path(tmp) / f"model-{first_type}.gguf"
        shim = [sys.executable, "-m", "workers.llamacpp.shim"]
        convert_cmd = [*shim, "convert", str(source)]
        if pre_tokenizer:
            convert_cmd += ["--pre-tokenizer", pre_tokenizer]
        convert_cmd += [str(hf_dir), "--outfile", str(converted), "--outtype", first_type]
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tensors"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            code, lines = _run_step(
                convert_cmd,
                progress,
                f"converting to {first_type}",
                _CONVERTED,
                _tensor_count(hf_dir),
            )
            if code != 0:
                raise _failure("conversion", code, lines)
            result = converted
            if quantize not in CONVERTER_TYPES:
                result = Path(tmp) / f"model-{quantize}.gguf"
                quantize_cmd = [*shim, "quantize", str(converted), str(result), quantize]
                code, lines = _run_step(
                    quantize_cmd, progress, f"quantizing to {quantize}", _QUANTIZED, None
                )
                if code != 0:
                    raise _failure("quantization", code, lines)
        shutil.move(result, output)
    return output
