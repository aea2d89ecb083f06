"""The gateway's routing table, kept fresh by long-polling the controller.

No controller call per request: a request does one dictionary lookup in the
in-memory table. The table is built once per version of the controller's: one
entry per served model (its policy, one instance for all its names, so an alias
and its model share one round-robin counter) and its ready workers with their
addresses parsed. If the controller is unreachable the last table stays in use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from fleetserve import constants
from fleetserve.protocol import RouteTable, WorkerLoad, WorkerState, WorkerView
from gateway.routing import RoutingPolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """A ready worker as the hot path and the policies see it."""

    worker_id: str
    capacity: int
    load: WorkerLoad
    host: str
    port: int
    #: The engine's OpenAI path prefix (``/v1``), to which the request's path is appended.
    path_prefix: str

    @classmethod
    def of(cls, worker: WorkerView) -> Target | None:
        url = urlsplit(worker.base_url)
        if url.scheme != "http" or not url.hostname:
            logger.warning("worker %s: unsupported URL %r", worker.worker_id, worker.base_url)
            return None
        return cls(
            worker.worker_id,
            worker.capacity,
            worker.load,
            url.hostname,
            url.port or 80,
            url.path.rstrip("/").removesuffix("/v1"),
        )


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """What a requested name routes to: its model, the model's policy, the ready workers."""

    model: str
    policy: RoutingPolicy
    #: Ready workers serving the name (every worker of the model, unless an alias is new).
    workers: tuple[Target, ...]


class RoutingTable:
    """One version of the controller's table, as the hot path reads it."""

    def __init__(
        self,
        table: RouteTable | None = None,
        previous: RoutingTable | None = None,
        default_policy: str | None = None,
    ):
        """``default_policy``: for models whose registrations name none (the gateway's)."""
        self.version: int | None = table.version if table else None
        self.epoch = table.epoch if table else ""
        self.workers = len(table.workers) if table else 0
        #: Every served name and alias -> its route (models with no ready worker included).
        self.by_name: dict[str, ModelRoute] = {}
        #: Served model -> its policy, carried over from version to version while unchanged.
        self.policies: dict[str, RoutingPolicy] = {}
        if table is None:
            return
        old = previous.policies if previous else {}
        wanted = {model.name: model.routing_policy for model in table.models}
        # Models whose registrations name no policy: the gateway's default, else kv_events
        # where their engines publish KV events, else the registry's default.
        for worker in table.workers:
            model = worker.model_names[0]
            if wanted.get(model) is None:
                kv = constants.KV_EVENTS_DEFAULT_POLICY if worker.kv_events_url else None
                wanted[model] = default_policy or kv
        by_model: dict[str, dict[str, list[Target]]] = {}  # model -> name -> ready workers
        for worker in table.workers:
            names = by_model.setdefault(worker.model_names[0], {})
            target = Target.of(worker) if worker.state is WorkerState.READY else None
            for name in worker.model_names:
                ready = names.setdefault(name, [])
                if target is not None:
                    ready.append(target)
        for model, names in by_model.items():
            policy = self.policies[model] = _policy(model, wanted.get(model), old.get(model))
            shared = tuple(names[model])
            for name, ready in names.items():
                if name in self.by_name:
                    logger.warning("name %s is served by %s and by another model", name, model)
                    continue
                workers = shared if len(ready) == len(shared) else tuple(ready)
                self.by_name[name] = ModelRoute(model, policy, workers)


def _policy(model: str, name: str | None, previous: RoutingPolicy | None) -> RoutingPolicy:
    """The model's policy: ``previous`` when unchanged (it may hold state), else a new one."""
    try:
        cls = RoutingPolicy.named(name)
    except KeyError:
        logger.warning("unknown routing policy %r for %s: using the default", name, model)
        cls = RoutingPolicy.named(None)
    return previous if type(previous) is cls else cls()


class RouteTableWatcher:
    def __init__(
        self,
        controller_url: str,
        session: aiohttp.ClientSession | None,
        deadline_s: float = constants.WATCH_TIMEOUT_S + constants.WATCH_DEADLINE_MARGIN_S,
        default_policy: str | None = None,
    ) -> None:
        """``deadline_s``: how long one long poll may take before the controller counts as down."""
        self._url = controller_url.rstrip("/") + "/routes"
        #: Set before run() (the gateway's lifespan opens it).
        self.session = session
        self.deadline_s = deadline_s
        self.default_policy = default_policy
        self.routes = RoutingTable()
        #: Called with each new table, as received and as routed (the KV event streams
        #: follow the workers of models routed by their events).
        self.listeners: list[Callable[[RouteTable, RoutingTable], None]] = []

    def apply(self, table: RouteTable) -> None:
        self.routes = routes = RoutingTable(table, self.routes, self.default_policy)
        for listener in self.listeners:
            listener(table, routes)
        logger.info(
            "routing table v%d from controller %s: %d workers, models %s",
            table.version,
            table.epoch,
            len(table.workers),
            ", ".join(sorted(routes.by_name)) or "none",
        )

    async def run(self) -> None:
        """Watch the controller forever."""
        assert self.session is not None, "the watcher needs an HTTP session"
        controller_down_since: float | None = None
        while True:
            routes = self.routes
            routing = routes.workers > 0
            params = {
                "epoch": routes.epoch,
                "after": str(-1 if routes.version is None else routes.version),
                "timeout_s": str(
                    constants.WATCH_TIMEOUT_S if routing else constants.WATCH_EMPTY_TIMEOUT_S
                ),
            }
            try:
                # asyncio's timeout, not aiohttp's: aiohttp 3.14 enters its total timeout twice
                # per request and uncancels the task twice when it fires, so a cancellation that
                # arrives with it (a lifespan closing after the loop was paused past the deadline)
                # became a TimeoutError and the watcher polled on, forever.
                async with (
                    asyncio.timeout(self.deadline_s),
                    self.session.get(self._url, params=params) as response,
                ):
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
