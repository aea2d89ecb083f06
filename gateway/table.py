"""The gateway's copy of the routing table, kept fresh by long-polling the controller.

No controller call per request: requests read the in-memory table. If the
controller is unreachable the last table stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from fleetserve import constants
from fleetserve.protocol import RouteTable, WorkerState, WorkerView

logger = logging.getLogger(__name__)


class RouteTableWatcher:
    def __init__(self, controller_url: str, session: aiohttp.ClientSession) -> None:
        self._url = controller_url.rstrip("/") + "/routes"
        self._session = session
        self.table: RouteTable | None = None
        self.ready_by_model: dict[str, list[WorkerView]] = {}
        self.cooldown_until: dict[str, float] = {}  # worker_id -> monotonic time

    def apply(self, table: RouteTable) -> None:
        ready_by_model: dict[str, list[WorkerView]] = {}
        for worker in table.workers:
            for name in worker.model_names:
                workers = ready_by_model.setdefault(name, [])
                if worker.state is WorkerState.READY:
                    workers.append(worker)
        self.table = table
        self.ready_by_model = ready_by_model
        logger.info(
            "routing table v%d from controller %s: %d workers, models %s",
            table.version,
            table.epoch,
            len(table.workers),
            ", ".join(sorted(ready_by_model)) or "none",
        )

    def candidates(self, model: str) -> list[WorkerView] | None:
        """Ready workers of ``model`` not cooling down; None if no worker serves that name."""
        workers = self.ready_by_model.get(model)
        if workers is None:
            return None
        now = time.monotonic()
        return [w for w in workers if self.cooldown_until.get(w.worker_id, 0.0) <= now]

    def cool_down(self, worker_id: str) -> None:
        self.cooldown_until[worker_id] = time.monotonic() + constants.WORKER_COOLDOWN_S

    async def run(self) -> None:
        """Watch the controller forever."""
        controller_down_since: float | None = None
        timeout = aiohttp.ClientTimeout(total=constants.WATCH_TIMEOUT_S + 10)
        while True:
            routing = bool(self.table and self.table.workers)
            params = {
                "epoch": self.table.epoch if self.table else "",
                "after": str(self.table.version if self.table else -1),
                "timeout_s": str(
                    constants.WATCH_TIMEOUT_S if routing else constants.WATCH_EMPTY_TIMEOUT_S
                ),
            }
            try:
                async with self._session.get(self._url, params=params, timeout=timeout) as response:
                    response.raise_for_status()
                    if response.status == 200:
                        self.apply(RouteTable.model_validate_json(await response.read()))
                if controller_down_since is not None:
                    logger.info(
                        "controller reachable again after %.1fs",
                        time.monotonic() - controller_down_since,
                    )
                    controller_down_since = None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if controller_down_since is None:
                    controller_down_since = time.monotonic()
                    logger.warning(
                        "controller unreachable (%s); serving the last routing table",
                        exc or type(exc).__name__,
                    )
                await asyncio.sleep(constants.WATCH_RETRY_S)
