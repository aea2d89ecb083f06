"""One model replica as a Ray Serve deployment: the worker agent and its engine as a child.

Ray places the replica (with the GPUs of its tensor-parallel group, which the
agent finds in CUDA_VISIBLE_DEVICES), asks it for its health and replaces it
when the worker has exited, and scales it on the load it reports. Requests
never pass through Ray: the agent registers the engine with the fleetserve
controller as any worker does, and gateways talk to the engine directly. The
replica learns its worker's state from the agent's status server (/health,
/metrics), as Kubernetes' probes and Prometheus do.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx

from fleetserve import constants, procs
from fleetserve.cli.args import settings_argv
from fleetserve.cli.cluster import ModelSpec
from fleetserve.cli.up import worker_settings
from fleetserve.ray.autoscaling import ONGOING_REQUESTS
from workers.agent import free_port
from workers.load import parse_load

# A replica being stopped drains first: out of the routing table, in-flight requests done.
SHUTDOWN_GRACE_S = constants.DRAIN_TIMEOUT_S + constants.REAPER_STOP_GRACE_S + 10


def spans_nodes(spec: ModelSpec) -> bool:
    """Pipeline stages go to other nodes: vLLM's Ray executor places every rank itself."""
    return spec.pipeline_parallel_size > 1


class FleetReplica:
    """The Serve deployment class; ``fleetserve ray deploy`` makes one deployment per model."""

    def __init__(self, spec_json: str, controller_url: str) -> None:
        import ray

        spec = ModelSpec.model_validate_json(spec_json)
        node_ip = ray.util.get_node_ip_address()
        port = status_port = free_port(node_ip)
        while status_port == port:
            status_port = free_port(node_ip)
        self._status_url = f"http://{node_ip}:{status_port}"
        self._start_timeout_s = spec.start_timeout_s
        settings = worker_settings(spec, node_ip, node_ip).model_copy(
            update={
                "controller_url": controller_url,
                "port": port,
                "status_port": status_port,
                # Ray replaces the replica when the engine dies: the agent must not hide that.
                "exit_when_engine_dies": True,
                "ray_address": ray.get_runtime_context().gcs_address if spans_nodes(spec) else None,
            }
        )
        cmd = [sys.executable, "-m", "fleetserve.cli", "worker"]
        cmd += [*settings_argv(settings, skip=("engine_args",)), "--", *settings.engine_args]
        self._proc: subprocess.Popen[bytes] | None = None
        started = threading.Event()
        threading.Thread(target=self._run_worker, args=(cmd, started), daemon=True).start()
        started.wait()
        self._wait_ready()
        self._http = httpx.AsyncClient(timeout=2.0)

    def _wait_ready(self) -> None:
        """Return once the engine answers and the worker is registered: to Serve the
        replica starts only now, so a deploy reports RUNNING when gateways can route to
        it, and a rolling update stops the next old replica only when its successor
        takes requests."""
        budget_s = self._start_timeout_s
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self._status_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        procs.stop(self.proc)
        raise RuntimeError(f"worker not ready after {budget_s:.0f}s (start_timeout_s)")

    def _run_worker(self, cmd: list[str], started: threading.Event) -> None:
        # The parent-death signal fires when the *thread* that started the child ends,
        # and Serve may build replicas on a pool thread: this thread lives as long as
        # the worker. The agent's log goes where Ray puts this replica's (`ray logs`).
        self._proc = procs.spawn(cmd)
        started.set()
        self._proc.wait()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None
        return self._proc

    async def check_health(self) -> None:
        """Serve's health check: raising makes Ray replace this replica."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited with code {self.proc.returncode}")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the engine's running + waiting requests
        (the agent's /metrics carry the engine's)."""
        try:
            response = await self._http.get(f"{self._status_url}/metrics")
            load = parse_load(response.text)
        except (httpx.HTTPError, ValueError):
            return {ONGOING_REQUESTS: 0.0}  # still loading
        return {ONGOING_REQUESTS: float(load.running + load.waiting)}

    def __del__(self) -> None:
        # Serve's graceful shutdown (scale down, rolling update, `fleetserve ray down`):
        # SIGTERM makes the agent drain, deregister and stop its engine.
        procs.stop(self.proc, SHUTDOWN_GRACE_S)
