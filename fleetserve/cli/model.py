"""`fleetserve model ...`: pull from a hub, GGUF conversion and the model cache listing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from fleetserve.auth import ClusterToken, client_token
from fleetserve.cli.args import add_controller_url, validation_context
from fleetserve.cli.cluster import load_cluster_file
from fleetserve.cli.status import fetch_table, make_console
from fleetserve.errors import ConfigError
from workers.engines import Engine
from workers.llamacpp.convert import QUANT_TYPES
from workers.modelcache import CachedModel


def cmd_model_convert(args: argparse.Namespace) -> int:
    from workers.llamacpp.convert import convert_to_gguf, gguf_file_type
    from workers.llamacpp.source import server_binary

    path = convert_to_gguf(args.hf_dir, args.quantize, args.output, args.pre_tokenizer)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({gguf_file_type(path)}, {size_mb:.1f} MiB)")
    engine, slots = ("llama-server", " -- --parallel 4") if server_binary() else ("llamacpp", "")
    command = f"fleetserve worker --engine {engine} --served-name NAME --source {path}{slots}"
    print(f"serve it: {command}")
    return 0


def cmd_model_pull(args: argparse.Namespace) -> int:
    from workers.hub import is_hub_id, pull

    if args.file:
        cluster = load_cluster_file(args.file, context=validation_context())
        specs = [spec for spec in cluster.models if args.model in (None, spec.name)]
        if not specs:
            raise ConfigError(f"{args.file} has no model named {args.model!r}")
        sources = [
            spec.source
            for spec in specs
            if Engine.named(spec.engine).loads_hub_models and is_hub_id(spec.source)
        ]
        sources += [a.source for spec in specs for a in spec.adapters if is_hub_id(a.source)]
        if not sources:
            print(f"{args.file}: no model to pull (local paths, the demo model, GGUF files)")
    elif args.model:
        raise ConfigError("--model picks a model of a cluster file: give -f CLUSTER_FILE too")
    elif args.source:
        # a local path (or nothing: the demo model) is read where it is: nothing to pull
        sources = [args.source] if is_hub_id(args.source) else []
        if not sources:
            print(f"{args.source}: not a hub model (org/name): nothing to pull")
    else:
        raise ConfigError("give a model (org/name) or -f CLUSTER_FILE")
    for source in dict.fromkeys(sources):
        pulled = pull(source, args.revision, progress=print, progress_every_s=args.progress_every_s)
        print(f"{source}: {pulled.path}")
    return 0


def served_by(
    models: list[CachedModel],
    controller_url: str,
    token: ClusterToken | None = None,
    ca_file: str | None = None,
) -> bool:
    """Fill each model's ``served_by`` with the workers serving it under its cache name.

    Workers register names, not files, so a model served under another name is not
    matched. False (and nothing filled) when the controller cannot be reached.
    """
    try:
        table = fetch_table(controller_url, token, ca_file)
    except (httpx.HTTPError, ValueError):
        return False
    for model in models:
        model.served_by = [w.base_url for w in table.workers if model.name in w.model_names]
    return True


def cmd_model_list(args: argparse.Namespace) -> int:
    from workers.modelcache import list_models

    models = list_models()
    served_by(models, args.controller_url, client_token(args.cluster_token_file), args.ca_file)
    console = make_console()
    if not models:
        console.print("no models in the cache yet (`fleetserve model convert`, `fleetserve up`)")
        return 0
    table = Table("name", "format", "size", "quantization", "served at", "path")
    for m in models:
        size = f"{m.size_bytes / 2**20:.1f} MiB"
        served = ", ".join(m.served_by) or "-"
        table.add_row(m.name, m.format, size, m.quantization, served, str(m.path))
    console.print(table)
    return 0


def register(sub: Any) -> None:
    """Add `model convert` and `model list` to the CLI's subcommands."""
    model = sub.add_parser(
        "model", help="Models on disk: pull from a hub, convert to GGUF, list the cache."
    )
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND")
    pull = model_sub.add_parser(
        "pull",
        help="Download a hub model's files into the cache, where engines read them.",
        description="Fetches every file of a Hugging Face model (huggingface_hub: $HF_ENDPOINT, "
        "$HF_TOKEN; an interrupted pull resumes where it stopped) into the Hugging Face "
        "cache ($HF_HOME/hub), where vLLM finds a hub id. Workers pull their model before "
        "starting the engine; on Kubernetes an init container does, and serving pods only "
        "read. A gated or private model without a token, or a wrong name, fails at once.",
    )
    pull.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="A hub id, org/name (a local path is read where it is: nothing to pull).",
    )
    pull.add_argument(
        "-f", "--file", type=Path, help="Pull every hub model of this cluster file instead."
    )
    pull.add_argument(
        "--model", metavar="NAME", help="With -f: only this model of the file (its name)."
    )
    pull.add_argument("--revision", default="main", help="Branch, tag or commit (default: main).")
    pull.add_argument(
        "--progress-every-s",
        type=float,
        default=5.0,
        help="Seconds between progress lines (default: %(default)s).",
    )
    pull.set_defaults(func=cmd_model_pull)
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
