"""`fleetserve model ...`: GGUF conversion and the model cache listing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleetserve.cli_args import add_controller_url
from fleetserve.config import ConfigError
from fleetserve.gguf_convert import QUANT_TYPES


def cmd_model_convert(args: argparse.Namespace) -> int:
    from fleetserve.gguf_convert import convert_to_gguf
    from fleetserve.modelcache import gguf_file_type

    try:
        path = convert_to_gguf(args.hf_dir, args.quantize, args.output, args.pre_tokenizer)
    except ConfigError as exc:
        sys.exit(f"fleetserve model convert: {exc}")
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({gguf_file_type(path)}, {size_mb:.1f} MiB)")
    from fleetserve.llamacpp_source import server_binary

    engine, slots = ("llama-server", " -- --parallel 4") if server_binary() else ("llamacpp", "")
    print(f"serve it: fleetserve worker --engine {engine} --served-name NAME --model {path}{slots}")
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    from fleetserve.modelcache import list_models, served_by
    from fleetserve.status import make_console

    models = list_models()
    served_by(models, args.controller_url)
    console = make_console()
    if not models:
        console.print("no models in the cache yet (`fleetserve model convert`, `fleetserve up`)")
        return 0
    from rich.table import Table

    table = Table("name", "format", "size", "quantization", "served at", "path")
    for m in models:
        size = f"{m.size_bytes / 2**20:.1f} MiB"
        served = ", ".join(m.served_by) or "-"
        table.add_row(m.name, m.format, size, m.quantization, served, str(m.path))
    console.print(table)
    return 0


def add_model_commands(sub: Any) -> None:
    """Add `model convert` and `model list` to the CLI's subcommands."""
    model = sub.add_parser("model", help="Models on disk: convert to GGUF, list the cache.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    convert = model_sub.add_parser(
        "convert",
        help="Make a GGUF file (llama.cpp) of a Hugging Face model directory.",
        description="Runs llama.cpp's converter (and its quantizer for types it does not "
        "write itself); the file goes to the model cache unless --output says otherwise.",
    )
    convert.add_argument("hf_dir", type=Path, metavar="HF_DIR", help="Hugging Face model dir.")
    convert.add_argument("--to", choices=["gguf"], default="gguf", help="Format (gguf).")
    convert.add_argument(
        "--quantize", choices=QUANT_TYPES, default="f16", help="Weight type (default: f16)."
    )
    convert.add_argument("--output", type=Path, help="Where to write (default: the cache).")
    convert.add_argument(
        "--pre-tokenizer",
        help="llama.cpp's pre-tokenizer name, for a BPE tokenizer it does not recognize "
        "(GPT-2-style ByteLevel ones are recognized as gpt-2).",
    )
    convert.set_defaults(func=cmd_model_convert)
    listing = model_sub.add_parser("list", help="Models in the cache and where they are served.")
    add_controller_url(listing, "Ask this controller which models are served")
    listing.set_defaults(func=cmd_model_list)
