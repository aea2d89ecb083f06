"""A replica spanning nodes: a Ray cluster across them, vLLM's Ray executor on top.

Rank 0 (the head) starts a Ray head, waits until every node has joined, then
starts the engine with ``RAY_ADDRESS`` pointing at it; vLLM places the ranks of
other pipeline stages on the other nodes as Ray actors. Other ranks only run a
Ray node (``ray start --block``) and rejoin when it drops out.

Only the head's port (``--ray-port``) is fixed, since the other nodes must know it.
Every other port this Ray listens on by a fixed default is picked free on its node
at start: SkyPilot runs a Ray of its own on every node it launches, on 6380
(dashboard 8266, agents 52365, client server 10001), and a dashboard on the head's
port + 1 (6380 for the default 6379) failed to bind there.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)


# The agent has drained the engine before it stops its Ray node: Ray's own drain
# on SIGTERM (meant for Ray Serve replicas) would only delay the stop by 30 s.
RAY_NODE_ENVIRONMENT = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def head_address(settings: WorkerSettings) -> str:
    return f"{settings.nodes[0]}:{settings.ray_port}"


@dataclass(frozen=True)
class RayPorts:
    """The ports of this node's Ray that would otherwise be fixed defaults, picked free."""

    dashboard: int  # the head's, on loopback
    client_server: int  # the head's (Ray Client; fleetserve does not use it)
    dashboard_agent: int  # every node's

    @classmethod
    def pick(cls, node_ip: str) -> RayPorts:
        with contextlib.ExitStack() as held:  # held together: three different ports
            socks = [held.enter_context(socket.socket()) for _ in range(3)]
            for sock, host in zip(socks, ("127.0.0.1", node_ip, node_ip), strict=True):
                sock.bind((host, 0))
            ports = [int(sock.getsockname()[1]) for sock in socks]
        return cls(*ports)

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard, as the head itself reaches it (on loopback only: see below)."""
        return f"http://127.0.0.1:{self.dashboard}"


def ray_start_command(settings: WorkerSettings, ports: RayPorts) -> list[str]:
    """``ray start --block``: runs until stopped, so the agent supervises it like an engine."""
    me = settings.nodes[settings.node_rank]
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--block", "--disable-usage-stats", "--node-ip-address", me]
    cmd += ["--dashboard-agent-listen-port", str(ports.dashboard_agent)]
    if settings.node_rank > 0:
        return [*cmd, "--address", head_address(settings)]
    return [
        *cmd,
        "--head",
        "--port",
        str(settings.ray_port),
        "--ray-client-server-port",
        str(ports.client_server),
        "--include-dashboard",
        "true",
        # Ray's dashboard serves its Jobs API (run any command) without authentication: on
        # loopback, where only the head's own agent reads it (alive_nodes).
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(ports.dashboard),
    ]


async def alive_nodes(http: httpx.AsyncClient, ports: RayPorts) -> int:
    """Nodes of the Ray cluster that are up, from the head's dashboard (0 if unreachable)."""
    try:
        response = await http.get(f"{ports.dashboard_url}/api/v0/nodes")
        response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.debug("Ray dashboard not answering yet: %s", exc)
        return 0
    return sum(1 for node in nodes if node.get("state") == "ALIVE")
