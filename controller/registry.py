"""The worker registry: soft state, rebuilt from heartbeats after a restart.

Pure logic with an injectable clock, no I/O: the HTTP layer (api.py) calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from controller.adapters import place
from controller.protocol import DeclaredModel, ModelLoad, ModelState
from fleetserve import constants
from fleetserve.adapters import LORA_ENGINE
from fleetserve.protocol import (
    AdapterLoad,
    Heartbeat,
    HeartbeatReply,
    ModelView,
    Registration,
    RouteTable,
    WorkerInfo,
    WorkerLoad,
    WorkerState,
    WorkerView,
    model_state,
)

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    registration: Registration
    last_heartbeat: float
    #: Heartbeats missed since the last one received, as counted so far.
    missed: int = 0

    @property
    def model(self) -> str:
        return self.registration.model_names[0]


class Registry:
    """Workers by id, with a version that changes whenever the routing table does."""

    def __init__(
        self,
        expiry_after_s: float,
        warmup_s: float,
        clock: Callable[[], float] = time.monotonic,
        heartbeat_interval_s: float | None = None,
    ) -> None:
        """``heartbeat_interval_s``: what workers are told; with it, missed heartbeats count."""
        self.epoch = uuid.uuid4().hex[:12]
        self.version = 0
        self.expiry_after_s = expiry_after_s
        self.started_at = clock()
        self.warm_at = self.started_at + warmup_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.registrations_total = 0
        self.expirations_total = 0
        # For metrics, by served model name (first name); models seen once stay known,
        # so "no ready worker of model X" is a zero, not a series that vanished.
        self.models_seen: set[str] = set()
        self.registrations_by_model: Counter[str] = Counter()
        self.expirations_by_model: Counter[str] = Counter()
        self.heartbeats_by_model: Counter[str] = Counter()
        self.missed_heartbeats_by_model: Counter[str] = Counter()
        self._clock = clock
        self._workers: dict[str, _Entry] = {}
        #: Served model name -> the model as its newest registration describes it (routing
        #: policy, fallbacks, aliases); kept after its last worker left, see table().
        self._models: dict[str, ModelView] = {}
        #: Models that should exist, by served name (DeclaredModel): published with or
        #: without workers.
        self._declared: dict[str, DeclaredModel] = {}
        #: Declared model -> since when it has replicas wanted and none registered; its
        #: first registration ends the cold start (counted by model, with its duration).
        self._starting_since: dict[str, float] = {}
        self.cold_starts_by_model: Counter[str] = Counter()
        self.cold_start_seconds_by_model: dict[str, float] = {}
        #: Declared model -> when a gateway last held a request for it (demand()).
        self._demand_at: dict[str, float] = {}
        #: Adapter -> the worker it is placed on and since when, until that worker reports it
        #: registered (controller/adapters.py).
        self._placing: dict[str, tuple[str, float]] = {}
        self.adapter_loads: Counter[str] = Counter()
        self.adapter_unloads: Counter[str] = Counter()
        self.adapter_load_seconds: dict[str, float] = {}
        self.adapter_timed_loads: Counter[str] = Counter()
        self._changed = asyncio.Event()

    # -- changes -------------------------------------------------------------

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def register(self, registration: Registration) -> None:
        known = registration.worker_id in self._workers
        model = registration.model_names[0]
        others = {
            entry.registration.routing_policy
            for worker_id, entry in self._workers.items()
            if entry.model == model and worker_id != registration.worker_id
        }
        if others - {registration.routing_policy}:
            logger.warning(
                "model %s: worker %s registers routing policy %s, other workers registered %s; "
                "the newest registration's wins",
                model,
                registration.worker_id,
                registration.routing_policy or "(default)",
                ", ".join(sorted(p or "(default)" for p in others)),
            )
        self._models[model] = ModelView(
            name=model,
            routing_policy=registration.routing_policy,
            fallbacks=registration.fallbacks,
            aliases=registration.model_names[1:],
        )
        self._workers[registration.worker_id] = _Entry(registration, self._clock())
        since = self._starting_since.pop(model, None)
        if since is not None:
            self.cold_starts_by_model[model] += 1
            seconds = self.cold_start_seconds_by_model.get(model, 0.0) + self._clock() - since
            self.cold_start_seconds_by_model[model] = seconds
            logger.info("model %s: first replica ready after %.1fs", model, self._clock() - since)
        self.registrations_total += 1
        self.registrations_by_model[model] += 1
        self.models_seen.add(model)
        self._bump()
        logger.info(
            "worker %s %s: %s at %s",
            registration.worker_id,
            "re-registered" if known else "registered",
            ",".join(registration.model_names),
            registration.base_url,
        )

    def declare(self, model: DeclaredModel) -> None:
        """``model`` should exist (again, or as changed): gateways hold its requests while it
        has no ready worker."""
        if self._declared.get(model.name) == model:
            return
        self._declared[model.name] = model
        self.models_seen.add(model.name)
        served = any(entry.model == model.name for entry in self._workers.values())
        if model.replicas and not served:
            self._starting_since.setdefault(model.name, self._clock())
        else:
            self._starting_since.pop(model.name, None)
        self._bump()
        logger.info("model %s declared: %d replica(s)", model.name, model.replicas)

    def adapter_conflict(self, adapter: DeclaredModel) -> str | None:
        """Why ``adapter`` (a declaration with a base) cannot be served; None if it can."""
        base = adapter.base
        workers = [e.registration for e in self._workers.values() if e.model == base]
        base_declared = self._declared.get(base or "")
        if base_declared is not None and base_declared.base is not None:
            return f"`{base}` is an adapter itself: an adapter's base is a model"
        if base_declared is None and not workers:
            return f"the base model `{base}` is neither declared nor served"
        if any(w.engine != LORA_ENGINE for w in workers):
            return (
                f"`{base}` runs on another engine than {LORA_ENGINE}: LoRA adapters are served "
                "by vLLM only (llama.cpp adapters are not supported)"
            )
        if workers and not any(w.max_adapters for w in workers):
            return (
                f"the replicas of `{base}` run without LoRA: give the model "
                "max_adapters_per_replica (its engines start with --enable-lora then)"
            )
        taken = {
            name: model
            for model, d in self._declared.items()
            if model != adapter.name
            for name in [model, *d.aliases]
        }
        for e in self._workers.values():
            taken.update(dict.fromkeys(e.registration.model_names, e.model))
        for name in [adapter.name, *adapter.aliases]:
            if name in taken:
                return f"the name `{name}` is already used by `{taken[name]}`"
        return None

    def undeclare(self, name: str) -> bool:
        """``name`` need not exist any more (its workers, if any, keep serving it; an
        adapter's are told to unregister it, and gateways stop routing it at once)."""
        if self._declared.pop(name, None) is None:
            return False
        self._starting_since.pop(name, None)
        self._placing.pop(name, None)
        self._bump()
        logger.info("model %s no longer declared", name)
        return True

    def demand(self, name: str) -> bool:
        """A gateway holds a request for declared model ``name`` (scaled to zero; an adapter:
        placed on a replica of its base), or for a model whose workers sleep: whatever starts
        replicas reads it (models()), sleeping workers learn it in their heartbeat's reply
        (wakes()). False for any other model."""
        declared = self._declared.get(name)
        if declared is None and not self._sleeping(name):
            return False
        if declared is not None and declared.base is not None:
            self._place(declared)
            return True
        if name not in self._demand_at or self._demand_at[name] < self._clock() - 1:
            logger.info("model %s: a gateway holds a request for it", name)
        self._demand_at[name] = self._clock()
        return True

    def _place(self, adapter: DeclaredModel) -> None:
        """Place ``adapter`` on a replica of its base, unless a placement is under way (one
        load for every request held, from any gateway) or a replica has it already."""
        now = self._clock()
        workers = [e.registration for e in self._workers.values() if e.model == adapter.base]
        if any(adapter.name in w.adapters for w in workers):
            return
        placing = self._placing.get(adapter.name)
        if placing is not None and placing[0] in self._workers:
            if now - placing[1] < constants.ADAPTER_PLACEMENT_TIMEOUT_S:
                return
            logger.warning("adapter %s: not registered by %s in time", adapter.name, placing[0])
        placed = Counter(wid for wid, _ in self._placing.values())
        worker_id = place(workers, placed)
        if worker_id is None:
            self._placing.pop(adapter.name, None)
            if not workers and adapter.base in self._declared:  # the base scaled to zero
                self._demand_at[adapter.base] = now
            return
        self._placing[adapter.name] = (worker_id, now)
        logger.info("adapter %s placed on %s", adapter.name, worker_id)

    def _adapters_reported(self, entry: _Entry, beat: Heartbeat) -> bool:
        """A worker's adapters as its heartbeat reports them; True if the table changes."""
        now = self._clock()
        adapters, errors = beat.adapters or [], beat.adapter_errors
        before = set(entry.registration.adapters)
        for name in before - set(adapters):
            self.adapter_unloads[name] += 1
        for name in set(adapters) - before:
            self.adapter_loads[name] += 1
            declared = self._declared.get(name)
            if declared is not None and declared.note:  # a failed load's, now stale
                self._declared[name] = declared.model_copy(update={"note": ""})
            placing = self._placing.pop(name, None)
            if placing is not None:
                seconds = self.adapter_load_seconds.get(name, 0.0) + now - placing[1]
                self.adapter_load_seconds[name] = seconds
                self.adapter_timed_loads[name] += 1
        changed = before != set(adapters)
        base_requests = beat.base_requests is not False
        if base_requests != entry.registration.base_requests:
            entry.registration = entry.registration.model_copy(
                update={"base_requests": base_requests}
            )
            changed = True
        for name, why in errors.items():
            placing = self._placing.get(name)
            declared = self._declared.get(name)
            if placing is not None and placing[0] == entry.registration.worker_id:
                del self._placing[name]
            if declared is not None and declared.note != why:
                self._declared[name] = declared.model_copy(update={"note": why})
                changed = True
        if changed:
            entry.registration = entry.registration.model_copy(update={"adapters": adapters})
        return changed

    def adapter_orders(self, worker_id: str) -> HeartbeatReply:
        """What the worker is to load (placed on it) and unload (no longer declared)."""
        entry = self._workers.get(worker_id)
        if entry is None:
            return HeartbeatReply(known=False)
        has = set(entry.registration.adapters)
        load = [
            AdapterLoad(name=name, source=self._declared[name].source)
            for name, (wid, _) in self._placing.items()
            if wid == worker_id and name not in has and name in self._declared
        ]
        unload = [
            name
            for name in sorted(has)
            if (d := self._declared.get(name)) is None or d.base != entry.model
        ]
        return HeartbeatReply(known=True, load_adapters=load, unload_adapters=unload)

    def heartbeat(self, worker_id: str, load: WorkerLoad, beat: Heartbeat | None = None) -> bool:
        """Record a heartbeat; False if the worker is unknown and must register again."""
        entry = self._workers.get(worker_id)
        if entry is None:
            return False
        entry.last_heartbeat = self._clock()
        entry.missed = 0
        self.heartbeats_by_model[entry.model] += 1
        changed = False
        if beat is not None and beat.adapters is not None:
            changed = self._adapters_reported(entry, beat)
        if entry.registration.load != load:
            entry.registration = entry.registration.model_copy(update={"load": load})
            changed = True
        if changed:
            self._bump()
        return True

    def _sleeping(self, model: str) -> bool:
        return any(
            e.model == model and e.registration.state is WorkerState.SLEEPING
            for e in self._workers.values()
        )

    def wakes(self, worker_id: str) -> bool:
        """Whether ``worker_id`` sleeps while a gateway holds a request for its model."""
        entry = self._workers.get(worker_id)
        if entry is None or entry.registration.state is not WorkerState.SLEEPING:
            return False
        asked = self._demand_at.get(entry.model)
        return asked is not None and self._clock() - asked < constants.DEMAND_FRESH_S

    def drain(self, worker_id: str) -> bool:
        entry = self._workers.get(worker_id)
        if entry is None:
            return False
        if entry.registration.state is not WorkerState.DRAINING:
            entry.registration = entry.registration.model_copy(
                update={"state": WorkerState.DRAINING}
            )
            self._bump()
            logger.info("worker %s draining", worker_id)
        return True

    def deregister(self, worker_id: str) -> bool:
        if self._workers.pop(worker_id, None) is None:
            return False
        self._bump()
        logger.info("worker %s deregistered", worker_id)
        return True

    def expire(self) -> list[str]:
        """Drop workers whose last heartbeat is older than ``expiry_after_s``.

        Also counts missed heartbeats: one per interval of silence past the
        first, with half an interval of grace for a late one.
        """
        now = self._clock()
        interval = self.heartbeat_interval_s
        if interval:
            for entry in self._workers.values():
                missed = int((now - entry.last_heartbeat - 0.5 * interval) // interval)
                if missed > entry.missed:
                    self.missed_heartbeats_by_model[entry.model] += missed - entry.missed
                    entry.missed = missed
        dead = [
            worker_id
            for worker_id, entry in self._workers.items()
            if now - entry.last_heartbeat > self.expiry_after_s
        ]
        for worker_id in dead:
            self.expirations_by_model[self._workers.pop(worker_id).model] += 1
            self.expirations_total += 1
            logger.warning(
                "worker %s expired: no heartbeat for %.1fs", worker_id, self.expiry_after_s
            )
        if dead:
            self._bump()
        return dead

    # -- views ---------------------------------------------------------------

    @property
    def warm(self) -> bool:
        """True once every live worker has had a chance to (re-)register."""
        return self._clock() >= self.warm_at

    def table(self) -> RouteTable:
        now = self._clock()
        workers = [
            WorkerView(
                **entry.registration.model_dump(include=set(WorkerInfo.model_fields)),
                last_heartbeat_age_s=round(now - entry.last_heartbeat, 3),
            )
            for entry in self._workers.values()
        ]
        served = {entry.model for entry in self._workers.values()}
        # A model with fallbacks stays in the table when its last worker leaves (its engine
        # died, it is being replaced): gateways then send its requests to the fallbacks. A
        # declared model is there before its first worker: gateways hold its requests.
        models = []
        for name in sorted(self._models.keys() | self._declared.keys()):
            declared = self._declared.get(name)
            view = self._models.get(name)
            if declared is not None:  # its workers' registrations say the rest, where any
                fields = declared.model_dump(exclude={"replicas", "note", "source"})
                view = (view or ModelView(**fields)).model_copy(
                    update={"declared": True, "replicas": declared.replicas, "note": declared.note}
                )
            if view is not None and (view.declared or name in served or view.fallbacks):
                models.append(view)
        return RouteTable(epoch=self.epoch, version=self.version, workers=workers, models=models)

    def models(self) -> list[ModelState]:
        """Every model of the table: declared, served, or kept for its fallbacks."""
        table = self.table()
        now = self._clock()
        ready = Counter(
            name  # a model's ready workers, or those with an adapter registered
            for worker in table.workers
            if worker.state is WorkerState.READY
            for name in [worker.model_names[0], *worker.adapters]
        )
        asleep = Counter(w.model_names[0] for w in table.workers if w.state is WorkerState.SLEEPING)
        return [
            ModelState(
                name=view.name,
                declared=view.declared,
                replicas=view.replicas,
                ready=ready[view.name],
                state=model_state(
                    view.declared, view.replicas, ready[view.name], asleep[view.name]
                ),
                base=view.base,
                registered_on=[w.worker_id for w in table.workers if view.name in w.adapters],
                demand_age_s=(
                    round(now - self._demand_at[view.name], 3)
                    if view.name in self._demand_at
                    else None
                ),
            )
            for view in table.models
        ]

    def model_load(self, name: str) -> ModelLoad | None:
        """Running and waiting requests over the workers of the model served as ``name``,
        and whether a gateway holds one for it (what scales it from zero); None when ``name``
        is neither declared nor served."""
        loads = [e.registration.load for e in self._workers.values() if e.model == name]
        if not loads and name not in self._declared:
            return None
        running, waiting = sum(x.running for x in loads), sum(x.waiting for x in loads)
        demanded = self._demand_at.get(name)
        held = int(demanded is not None and self._clock() - demanded < constants.HOLD_TIMEOUT_S)
        return ModelLoad(
            model=name,
            replicas=len(loads),
            running=running,
            waiting=waiting,
            held=held,
            ongoing=running + waiting + held,
        )

    async def wait_for_change(
        self, epoch: str, after_version: int, timeout_s: float
    ) -> RouteTable | None:
        """Long-poll: the table once it is newer than the caller's, or None after ``timeout_s``.

        A controller that is still warming up answers nothing newer: its table
        may be missing workers that have not re-registered yet.
        """
        deadline = self._clock() + timeout_s
        while True:
            if self.warm and (epoch != self.epoch or self.version > after_version):
                return self.table()
            remaining = deadline - self._clock()
            if remaining <= 0:
                return None
            if not self.warm:
                await asyncio.sleep(min(self.warm_at - self._clock(), remaining))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
