"""A replica spanning nodes: a Ray cluster across them, vLLM's Ray executor on top.

Rank 0 (the head) starts a Ray head, waits until every node has joined, then
starts the engine with ``RAY_ADDRESS`` pointing at it; vLLM places the ranks of
other pipeline stages on the other nodes as Ray actors. Other ranks only run a
Ray node (``ray start --block``) and rejoin when it drops out.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import httpx

from fleetserve.config import WorkerSettings

logger = logging.getLogger(__name__)


# The agent has drained the engine before it stops its Ray node: Ray's own drain
# on SIGTERM (meant for Ray Serve replicas) would only delay the stop by 30 s.
RAY_NODE_ENVIRONMENT = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def head_address(settings: WorkerSettings) -> str:
    return f"{settings.nodes[0]}:{settings.ray_port}"


def dashboard_url(settings: WorkerSettings) -> str:
    """The head's dashboard, as the head itself reaches it (on loopback only: see below)."""
    return f"http://127.0.0.1:{settings.ray_port + 1}"


def ray_start_command(settings: WorkerSettings) -> list[str]:
    """``ray start --block``: runs until stopped, so the agent supervises it like an engine."""
    me = settings.nodes[settings.node_rank]
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--block", "--disable-usage-stats", "--node-ip-address", me]
    if settings.node_rank > 0:
        return [*cmd, "--address", head_address(settings)]
    return [
        *cmd,
        "--head",
        "--port",
        str(settings.ray_port),
        "--include-dashboard",
        "true",
        # Ray's dashboard serves its Jobs API (run any command) without authentication: on
        # loopback, where only the head's own agent reads it (alive_nodes).
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(settings.ray_port + 1),
    ]


async def alive_nodes(http: httpx.AsyncClient, settings: WorkerSettings) -> int:
    """Nodes of the Ray cluster that are up, from the head's dashboard (0 if unreachable)."""
    try:
        response = await http.get(f"{dashboard_url(settings)}/api/v0/nodes")
        response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.debug("Ray dashboard not answering yet: %s", exc)
        return 0
    return sum(1 for node in nodes if node.get("state") == "ALIVE")
