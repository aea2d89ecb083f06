"""`fleetserve status`: models and workers as the controller sees them, optionally live, and
each worker's circuit as one gateway sees it (``--gateway-url``: the gateway's ``/status``).

Circuits are per gateway process (gateway/breaker.py): each gateway takes a failing worker
out on its own evidence, so the command asks the gateway the user names, not the controller.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from fleetserve.auth import ClusterToken, client_tls, client_token
from fleetserve.cli.args import add_controller_url
from fleetserve.protocol import ModelView, RouteTable, WorkerView, model_state


def make_console() -> Console:
    # Not a terminal (a log, CI): wide enough that worker ids and URLs are not cut.
    return Console() if sys.stdout.isatty() else Console(width=160)


def fetch_table(
    controller_url: str, token: ClusterToken | None = None, ca_file: str | None = None
) -> RouteTable:
    """The controller's view of the workers (engine secrets left out); httpx.HTTPError if it
    cannot be had (HTTPStatusError: a 401 for a missing or wrong cluster token)."""
    response = httpx.get(
        f"{controller_url.rstrip('/')}/workers",
        headers=token.header() if token else None,
        verify=client_tls(ca_file),
        timeout=5.0,
    )
    response.raise_for_status()
    return RouteTable.model_validate_json(response.content)


def describe_failure(controller_url: str, exc: httpx.HTTPError) -> str:
    """What to tell a user whose request to the controller failed."""
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401:
        return (
            f"the controller at {controller_url} refused: it needs the cluster token "
            "(--cluster-token-file FILE, or $FLEETSERVE_CLUSTER_TOKEN)"
        )
    return f"cannot reach the controller at {controller_url}: {exc}"


#: worker id -> what a gateway knows of it (its /status: circuit, failures, in flight).
GatewayView = dict[str, dict[str, Any]]


def fetch_gateway_view(gateway_url: str | None, ca_file: str | None = None) -> GatewayView | None:
    """The gateway's view of the workers; None without a gateway URL; {} if unreachable."""
    if not gateway_url:
        return None
    try:
        status = httpx.get(
            f"{gateway_url.rstrip('/')}/status", verify=client_tls(ca_file), timeout=5.0
        ).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {w["worker_id"]: w for w in status.get("workers", [])}


class TokenRates:
    """Output tokens/s per worker, from the token counters its heartbeats carry."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}  # worker -> (heartbeat time, tokens)
        self.rates: dict[str, float] = {}

    def update(self, table: RouteTable, now: float) -> dict[str, float]:
        for w in table.workers:
            beat = now - w.last_heartbeat_age_s
            before = self._last.get(w.worker_id)
            if before is None or beat - before[0] > 0.1:  # a new heartbeat since the last look
                if before is not None:
                    tokens = max(w.load.generated_tokens - before[1], 0)  # 0 after a restart
                    self.rates[w.worker_id] = tokens / (beat - before[0])
                self._last[w.worker_id] = (beat, w.load.generated_tokens)
        return self.rates


def _devices(worker: WorkerView) -> str:
    """``GPU 0,1``, ``cpu``, ``GPU 0,1,2,3 x 2 nodes``; ``-`` for engines without a device."""
    what = f"GPU {','.join(map(str, worker.gpu_ids))}" if worker.gpu_ids else worker.device or "-"
    return f"{what} x {worker.nodes} nodes" if worker.nodes > 1 else what


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _circuit(gateway: GatewayView, worker_id: str) -> str:
    seen = gateway.get(worker_id)
    if seen is None:
        return "?"  # unreachable gateway, or a worker it does not route yet
    failures = f" ({seen['failures']} failed)" if seen.get("failures") else ""
    return f"{seen['circuit']}{failures}"


def workers_table(
    table: RouteTable, rates: dict[str, float] | None = None, gateway: GatewayView | None = None
) -> Table:
    rates = rates or {}
    view = Table(title=f"workers (routing table v{table.version})")
    columns = ("model (aliases)", "worker", "state", "engine", "TP x PP", "devices", "endpoint")
    for column in (
        *columns,
        "run/wait",
        "KV",
        "tok/s",
        *(["circuit"] if gateway is not None else []),
    ):
        view.add_column(column, no_wrap=True)
    for w in sorted(table.workers, key=lambda w: (w.model_names[0], w.worker_id)):
        aliases = f" ({', '.join(w.model_names[1:])})" if len(w.model_names) > 1 else ""
        circuit = [_circuit(gateway, w.worker_id)] if gateway is not None else []
        view.add_row(
            w.model_names[0] + aliases,
            w.worker_id,
            w.state.value,
            w.engine,
            f"{w.tensor_parallel_size} x {w.pipeline_parallel_size}",
            _devices(w),
            w.base_url,
            f"{w.load.running}/{w.load.waiting}",
            f"{100 * w.load.kv_cache_usage:.0f}%",
            _rate(rates.get(w.worker_id)),
            *circuit,
        )
    if gateway == {}:
        view.caption = "circuit: the gateway did not answer"
    return view


def models_table(table: RouteTable, rates: dict[str, float]) -> Table:
    view = Table(title="models")
    columns = ("model", "state", "ready", "draining", "running", "waiting", "max KV", "tok/s")
    for column in columns:
        view.add_column(column, no_wrap=True)
    by_model: dict[str, list[WorkerView]] = {m.name: [] for m in table.models}
    for w in table.workers:
        by_model.setdefault(w.model_names[0], []).append(w)
    views = {m.name: m for m in table.models}
    for model, workers in sorted(by_model.items()):
        known = [rates[w.worker_id] for w in workers if w.worker_id in rates]
        ready = sum(w.state.value == "ready" for w in workers)
        declared = views.get(model)
        asleep = sum(w.state.value == "sleeping" for w in workers)
        state = model_state(bool(declared and declared.declared), _wanted(declared), ready, asleep)
        if state == "sleeping":  # (vLLM's sleep mode: a held request wakes them)
            state += f" ({asleep})"
        elif state == "starting" and declared is not None:
            state += f" ({ready} of {declared.replicas})"
        if declared is not None and declared.note and state != "ready":  # why it waits
            state += f": {declared.note}"
        view.add_row(
            model,
            state,
            str(ready),
            str(sum(w.state.value == "draining" for w in workers)),
            str(sum(w.load.running for w in workers)),
            str(sum(w.load.waiting for w in workers)),
            f"{100 * max((w.load.kv_cache_usage for w in workers), default=0):.0f}%",
            _rate(sum(known) if known else None),
        )
    return view


def _wanted(view: ModelView | None) -> int:
    return view.replicas if view is not None and view.declared else 0


def _view(
    table: RouteTable, rates: dict[str, float], gateway_url: str | None, ca_file: str | None
) -> Group:
    gateway = fetch_gateway_view(gateway_url, ca_file)
    return Group(models_table(table, rates), workers_table(table, rates, gateway))


def print_status(
    console: Console,
    controller_url: str,
    watch_s: float | None = None,
    token: ClusterToken | None = None,
    ca_file: str | None = None,
    gateway_url: str | None = None,
) -> int:
    """Print the picture once, or (``watch_s``) redraw it every ``watch_s`` until Ctrl-C;
    with ``gateway_url``, each worker's circuit as that gateway sees it."""
    url = controller_url.rstrip("/")
    rates = TokenRates()
    if watch_s is None:
        try:
            table = fetch_table(url, token, ca_file)
        except httpx.HTTPError as exc:
            console.print(f"[red]{describe_failure(url, exc)}[/red]")
            return 1
        console.print(_view(table, {}, gateway_url, ca_file))
        return 0
    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                try:
                    table = fetch_table(url, token, ca_file)
                    view = _view(table, rates.update(table, time.monotonic()), gateway_url, ca_file)
                    live.update(view, refresh=True)
                except httpx.HTTPError as exc:
                    live.update(f"[red]{describe_failure(url, exc)}[/red]")
                    live.refresh()
                time.sleep(watch_s)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    token = client_token(args.cluster_token_file)
    return print_status(
        make_console(), args.controller_url, args.watch, token, args.ca_file, args.gateway_url
    )


def register(sub: Any) -> None:
    status = sub.add_parser("status", help="Show the workers and models a controller knows.")
    add_controller_url(status, "The controller's URL")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="Redraw every SECONDS (default 2) with tokens/s, until Ctrl-C.",
    )
    status.add_argument(
        "--gateway-url",
        metavar="URL",
        help="Also show each worker's circuit (closed, half_open, open: taken out after "
        "failures) as the gateway at URL sees it; each gateway keeps its own.",
    )
    status.set_defaults(func=cmd_status)
