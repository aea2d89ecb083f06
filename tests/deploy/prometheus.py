"""A real Prometheus on loopback, run from deploy/prometheus with a cluster's targets."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from fleetserve import procs
from tests.deploy.test_prometheus_rules import PROMETHEUS
from tests.helpers import free_port, wait_until
from tests.tools import require_tool


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


class Prometheus:
    """The shipped config and rules, scraping every 3 s; ``targets``: job file -> hosts."""

    def __init__(self, directory: Path, log_dir: Path, targets: dict[str, list[str]]) -> None:
        binary = require_tool("prometheus")
        config_dir = directory / "config"
        shutil.copytree(PROMETHEUS, config_dir, dirs_exist_ok=True)
        config_path = config_dir / "prometheus.yml"
        config = yaml.safe_load(config_path.read_text())
        # A scrape timeout above the agent's wait for its engine's metrics (2 s): a failed
        # scrape marks the target's series stale, which at 1 s a stalled machine could cause.
        config["global"] = {
            "scrape_interval": "3s",
            "scrape_timeout": "3s",
            "evaluation_interval": "1s",
        }
        config_path.write_text(yaml.safe_dump(config))
        for name, hosts in targets.items():
            (config_dir / "targets" / name).write_text(json.dumps([{"targets": hosts}]))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = (log_dir / "prometheus.log").open("ab")
        self.proc = procs.spawn(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: _status(f"{self.url}/-/ready") == 200, 30, "prometheus to be ready")

    def close(self) -> None:
        procs.stop(self.proc, 10)
        self._log.close()

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} has several series: {result}"
        return float(result[0]["value"][1]) if result else None

    def eventually(self, expr: str, expected: float, timeout_s: float = 60) -> None:
        """Wait until Prometheus has scraped the value the traffic implies."""
        seen: list[float | None] = []

        def matches() -> bool:
            seen.append(self.value(expr))
            return seen[-1] == expected

        try:
            wait_until(matches, timeout_s, f"{expr} == {expected}", every_s=0.5)
        except AssertionError:
            raise AssertionError(f"{expr}: expected {expected}, last read {seen[-1]}") from None
