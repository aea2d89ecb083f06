"""`fleetserve adapter add|list|remove`: LoRA adapters at run time, over the controller's
authenticated API (the cluster token, as `fleetserve status`).

``add`` declares the adapter (``PUT /models/NAME`` with its base and directory, a hub id
pulled here first), checked here
first (files present and loadable, rank within the base's replicas' max_lora_rank) and by the
controller (base known and serving LoRA, no name taken): nothing restarts, and the first
request for it registers it on a replica. ``remove`` takes the declaration back: gateways stop
routing it at once, requests already running finish, then the replicas unregister it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

from controller.protocol import DeclaredModel, ModelState
from fleetserve.auth import client_tls, client_token
from fleetserve.cli.args import add_controller_url
from fleetserve.cli.status import describe_failure, fetch_table, make_console
from fleetserve.errors import ConfigError
from workers.adapters import inspect_adapter

_SAMPLE = re.compile(r"^(fleetserve_gateway_\w+?)(?:_total)?\{([^}]*)\} ([0-9.eE+-]+)$", re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> httpx.Response:
    token = client_token(args.cluster_token_file)
    try:
        response = httpx.request(
            method,
            f"{args.controller_url.rstrip('/')}{path}",
            headers=token.header() if token else None,
            verify=client_tls(args.ca_file),
            timeout=10.0,
            **kwargs,
        )
    except httpx.HTTPError as exc:
        raise ConfigError(describe_failure(args.controller_url, exc)) from None
    if response.status_code == 401:
        refused = httpx.HTTPStatusError("401", request=response.request, response=response)
        raise ConfigError(describe_failure(args.controller_url, refused))
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        raise ConfigError(message)
    return response


def local_source(source: str) -> str:
    """An adapter's directory on this machine: a hub id (org/name) pulled into the model
    cache first (as `fleetserve model pull` does: HF_TOKEN, HF_ENDPOINT), a path as given."""
    from workers.hub import is_hub_id, pull

    if is_hub_id(source):
        return str(pull(source).path)
    return str(Path(source).resolve())


def cmd_add(args: argparse.Namespace) -> int:
    source = local_source(args.source)
    token = client_token(args.cluster_token_file)
    try:
        table = fetch_table(args.controller_url, token, args.ca_file)
    except httpx.HTTPError as exc:
        raise ConfigError(describe_failure(args.controller_url, exc)) from None
    ranks = [w.max_lora_rank for w in table.workers if w.model_names[0] == args.model]
    facts = inspect_adapter(source, min((r for r in ranks if r), default=None))
    adapter = DeclaredModel(
        name=args.name, aliases=args.alias or [], replicas=0, base=args.model, source=source
    )
    _call(args, "PUT", f"/models/{args.name}", json=adapter.model_dump(mode="json"))
    print(
        f"adapter {args.name} of {args.model} added (rank {facts.rank}, "
        f"{', '.join(facts.target_modules)}): registered on a replica at its first request"
    )
    return 0


def _usage(gateway_url: str | None, ca_file: str | None) -> dict[str, tuple[float, float]]:
    """Model -> (requests, tokens) as the gateway at ``gateway_url`` counted them."""
    if not gateway_url:
        return {}
    try:
        text = httpx.get(
            f"{gateway_url.rstrip('/')}/metrics", verify=client_tls(ca_file), timeout=5.0
        ).text
    except httpx.HTTPError:
        return {}
    usage: dict[str, tuple[float, float]] = {}
    for name, labels, value in _SAMPLE.findall(text):
        model = dict(_LABEL.findall(labels)).get("model")
        if model is None or name.endswith("_created"):
            continue
        requests, tokens = usage.get(model, (0.0, 0.0))
        if name == "fleetserve_gateway_requests":
            requests += float(value)
        elif name in ("fleetserve_gateway_prompt_tokens", "fleetserve_gateway_completion_tokens"):
            tokens += float(value)
        usage[model] = (requests, tokens)
    return usage


def cmd_list(args: argparse.Namespace) -> int:
    models = [ModelState.model_validate(m) for m in _call(args, "GET", "/models").json()]
    adapters = [m for m in models if m.base is not None]
    console = make_console()
    if not adapters:
        console.print("no adapters (`fleetserve adapter add`, or adapters: in the cluster file)")
        return 0
    usage = _usage(args.gateway_url, args.ca_file)
    table = Table("adapter", "base", "registered on", "requests", "tokens")
    for m in adapters:
        requests, tokens = usage.get(m.name, (0.0, 0.0)) if usage else (None, None)
        table.add_row(
            m.name,
            m.base or "",
            ", ".join(m.registered_on) or "-",
            "?" if requests is None else f"{requests:.0f}",
            "?" if tokens is None else f"{tokens:.0f}",
        )
    if not usage:
        table.caption = "requests, tokens: give --gateway-url (each gateway counts its own)"
    console.print(table)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    models = [ModelState.model_validate(m) for m in _call(args, "GET", "/models").json()]
    if not any(m.name == args.name and m.base is not None for m in models):
        raise ConfigError(f"no adapter named {args.name!r} (`fleetserve adapter list`)")
    _call(args, "DELETE", f"/models/{args.name}")
    print(f"adapter {args.name} removed: requests already running finish first")
    return 0


def register(sub: Any) -> None:
    adapter = sub.add_parser(
        "adapter",
        help="LoRA adapters of a running cluster: add, list, remove (vllm models only).",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = adapter.add_subparsers(dest="adapter_command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", help="Serve a new adapter, nothing restarted.")
    add.add_argument("name", metavar="NAME", help="The model name clients will ask for.")
    add.add_argument("--model", required=True, metavar="BASE", help="Its base model's name.")
    add.add_argument(
        "--source",
        required=True,
        metavar="PATH",
        help="The adapter's directory (peft's save_pretrained), on the base's workers' disk, "
        "or a hub id (org/name): pulled into the model cache here first.",
    )
    add.add_argument("--alias", action="append", help="Another name for it (repeatable).")
    add.set_defaults(func=cmd_add)
    listing = commands.add_parser("list", help="Adapters, where each is registered, usage.")
    listing.add_argument(
        "--gateway-url", help="Read requests and tokens per adapter from this gateway's /metrics."
    )
    listing.set_defaults(func=cmd_list)
    remove = commands.add_parser("remove", help="Stop serving an adapter (in-flight ones finish).")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(func=cmd_remove)
    for command in (add, listing, remove):
        add_controller_url(command, "The cluster's controller")
