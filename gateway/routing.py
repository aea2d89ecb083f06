"""Routing policies, registered by name: which worker of a model gets a request.

Every policy has one signature, ``pick(candidates, ctx) -> worker``, with
``candidates`` never empty; policies are pure and unit-tested without a network.
A candidate is anything with a worker's id, capacity and load: the gateway's
routing-table targets, or the controller's worker views in the tests.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from fleetserve import constants
from fleetserve.kvblocks import block_keys, text_block_keys
from fleetserve.protocol import WorkerLoad
from fleetserve.registry import Registered

if TYPE_CHECKING:
    from gateway.kvindex import KvEvents
    from gateway.tokenize import PromptTokenizer

PREFIX_CHARS = 256  # about a system prompt's worth of leading text decides prefix affinity


class Candidate(Protocol):
    @property
    def worker_id(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def load(self) -> WorkerLoad: ...


C = TypeVar("C", bound=Candidate)


@dataclass
class RoutingContext:
    """What a policy may look at besides the candidates, for one request."""

    #: worker_id -> requests in flight from this gateway (shared by all requests)
    in_flight: dict[str, int] = field(default_factory=dict)
    #: the request body, parsed
    payload: dict[str, Any] = field(default_factory=dict)
    #: who is talking: the x-session-id header or the request's `user` field
    session: str | None = None
    #: the served model (its tokenizer, for cache-aware routing)
    model: str = ""
    #: the engines' KV caches as this gateway knows them (the ``kv_events`` policy reads it)
    kv: KvEvents | None = None
    #: seconds spent tokenizing this request (0 unless a policy asked for its tokens)
    tokenize_s: float = 0.0

    @functools.cached_property
    def _prompt(self) -> tuple[PromptTokenizer, str | list[int], bool] | None:
        tokenizer = self.kv.tokenizer(self.model) if self.kv is not None else None
        if tokenizer is None:
            return None
        started = time.perf_counter()
        prompt = tokenizer.prompt(self.payload)
        self.tokenize_s += time.perf_counter() - started
        return None if prompt is None else (tokenizer, *prompt)

    def prompt_head(self, max_chars: int) -> tuple[list[int], bool] | None:
        """The token ids of the prompt's first ``max_chars`` characters, and whether that is
        the whole prompt (if not, the last few ids may differ from the whole encoding's)."""
        if self._prompt is None:
            return None
        tokenizer, text, special = self._prompt
        if isinstance(text, list) or len(text) <= max_chars:
            return self.prompt_tokens or [], True
        started = time.perf_counter()
        head = tokenizer.encode(text[:max_chars], special)
        self.tokenize_s += time.perf_counter() - started
        return head, False

    @functools.cached_property
    def prompt_tokens(self) -> list[int] | None:
        """The prompt's token ids as the engine will see them; None without a tokenizer.

        Computed on first use only: policies that never ask never pay for it.
        """
        if self._prompt is None:
            return None
        tokenizer, text, special = self._prompt
        if isinstance(text, list):
            return text
        started = time.perf_counter()
        tokens = tokenizer.encode(text, special)
        self.tokenize_s += time.perf_counter() - started
        return tokens

    @functools.cached_property
    def prompt_text(self) -> str:
        """The whole prompt as text (messages: role and content in order), for text prefixes."""
        prompt = self.payload.get("prompt")
        if prompt is not None:
            return prompt if isinstance(prompt, str) else str(prompt[:1])
        parts: list[str] = []
        for message in self.payload.get("messages") or []:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role')}\x1f{content}")
        return "\x1e".join(parts)

    @functools.cached_property
    def prefix(self) -> str:
        """The prompt's first PREFIX_CHARS characters (messages in order), computed on demand."""
        prompt = self.payload.get("prompt")
        if prompt is not None:
            text = prompt if isinstance(prompt, str) else str(prompt[:1])
            return text[:PREFIX_CHARS]
        parts: list[str] = []
        size = 0
        for message in self.payload.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                parts.append(content)
                size += len(content)
            if size >= PREFIX_CHARS:
                break
        return "\x1e".join(parts)[:PREFIX_CHARS]


def load(worker: Candidate, ctx: RoutingContext) -> float:
    """Requests in flight from this gateway plus queued in the engine, per unit of capacity."""
    return (ctx.in_flight.get(worker.worker_id, 0) + worker.load.waiting) / worker.capacity


def rendezvous_order(key: str, candidates: Sequence[C]) -> list[C]:
    """Candidates by highest-random-weight hashing of ``key``: stable as workers come and go."""

    def weight(worker: C) -> bytes:
        return hashlib.blake2b(f"{key}|{worker.worker_id}".encode(), digest_size=8).digest()

    return sorted(candidates, key=weight, reverse=True)


class RoutingPolicy(Registered):
    """Base class; policies register with ``class X(RoutingPolicy, name="x")``."""

    kind = "routing policy"
    #: True when the policy reads the engines' KV events (the gateway follows them only then).
    needs_kv_events: ClassVar[bool] = False

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        raise NotImplementedError


class LeastLoadPolicy(RoutingPolicy, name="least_load", default=True):
    """The worker with the fewest requests in flight from this gateway plus queued in its engine.

    Ties are broken at random so that idle workers share the load evenly.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        lowest = min(load(worker, ctx) for worker in candidates)
        return self._rng.choice([w for w in candidates if load(w, ctx) == lowest])


class RoundRobinPolicy(RoutingPolicy, name="round_robin"):
    """Each worker in turn, whatever its load."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        ordered = sorted(candidates, key=lambda worker: worker.worker_id)
        return ordered[next(self._counter) % len(ordered)]


class PowerOfTwoPolicy(RoutingPolicy, name="power_of_two"):
    """The less loaded of two workers drawn at random: near least-load, without a full scan."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return a if load(a, ctx) <= load(b, ctx) else b


class PrefixAffinityPolicy(RoutingPolicy, name="prefix_affinity"):
    """Requests sharing a prompt prefix go to the same worker, so its prefix cache hits.

    Consistent hashing with bounded loads: the prefix ranks the workers, and the
    request goes to the first one whose in-flight requests stay within
    ``(1 + slack)`` times the average, but never below ``min_bound`` (an engine
    batches several requests at no cost, and a prefix should stay home while
    the cluster is quiet): one hot prefix spills to the next worker in its
    ranking instead of swamping its favourite.
    """

    slack = 0.25
    min_bound = 4

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        total = sum(ctx.in_flight.get(w.worker_id, 0) for w in candidates) + 1
        bound = max(math.ceil((1 + self.slack) * total / len(candidates)), self.min_bound)
        ranked = rendezvous_order(ctx.prefix, candidates)
        for worker in ranked:
            if ctx.in_flight.get(worker.worker_id, 0) + 1 <= bound:
                return worker
        return ranked[0]


class SessionPolicy(RoutingPolicy, name="session"):
    """The same session (x-session-id header or `user` field) always meets the same worker.

    Requests without a session are routed by least load.
    """

    def __init__(self) -> None:
        self._fallback = LeastLoadPolicy()

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        if ctx.session is None:
            return self._fallback.pick(candidates, ctx)
        return rendezvous_order(ctx.session, candidates)[0]


class CacheAwarePolicy(RoutingPolicy):
    """Prefix-cache hits against load, by one rule (the subclasses say what is cached where).

    The prompt is cut into blocks; ``cost(worker)`` estimates the blocks the worker must
    compute before this request's first token:

        cost = CACHE_AWARE_MISS_WEIGHT x blocks of this prompt it does not hold
             + (its requests in flight from this gateway + queued in its engine)
               x (blocks an average request made its engine compute, + 1)

    and the request goes to the lowest cost; ties to the worker holding fewer blocks (more
    room in its cache), then at random. A cached prefix keeps its requests while the queue
    in front of them costs less than computing the prefix elsewhere; past that it spills,
    and the prefix is then cached on both. A block computed again weighs more than a block
    waited for: the whole engine spends it (every request there waits), and in a full cache
    it evicts a block of another prefix, computed again later. With nothing cached anywhere
    (a uniform load), the rule is least load.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        #: blocks an average request made its engine compute (moving average)
        self.mean_cost = 1.0

    def match(self, candidates: Sequence[C], ctx: RoutingContext) -> tuple[list[int], list[int]]:
        """The prompt's block keys, and how many leading ones each candidate holds."""
        raise NotImplementedError

    def sent(self, worker: C, keys: list[int], ctx: RoutingContext) -> None:
        """The request with ``keys`` goes to ``worker``."""

    def held_blocks(self, worker: C, ctx: RoutingContext) -> int:
        return 0

    def pick(self, candidates: Sequence[C], ctx: RoutingContext) -> C:
        keys, matched = self.match(candidates, ctx)
        per_request = self.mean_cost + 1
        best: list[tuple[float, int, int]] = []  # (cost, held blocks, index)
        for i, worker in enumerate(candidates):
            queue = ctx.in_flight.get(worker.worker_id, 0) + worker.load.waiting
            cost: float = constants.CACHE_AWARE_MISS_WEIGHT * (len(keys) - matched[i])
            cost += queue * per_request
            best.append((cost, self.held_blocks(worker, ctx), i))
        lowest = min(best)[:2]
        index = self._rng.choice([i for cost, held, i in best if (cost, held) == lowest])
        chosen = candidates[index]
        computed = len(keys) - matched[index]
        self.mean_cost += (computed - self.mean_cost) * constants.CACHE_AWARE_COST_SMOOTHING
        self.sent(chosen, keys, ctx)
        return chosen


class KvEventsPolicy(CacheAwarePolicy, name="kv_events"):
    """Cache-aware from the engines' own KV events: what each engine holds, block by block.

    The gateway tokenizes the request as the engine does (gateway/tokenize.py) and looks its
    blocks up in the index every gateway builds from every worker's events
    (gateway/kvindex.py), plus what it sent itself in the last seconds. Without a tokenizer
    or events yet, requests count as misses everywhere: least load.
    """

    needs_kv_events = True

    def match(self, candidates: Sequence[C], ctx: RoutingContext) -> tuple[list[int], list[int]]:
        kv = ctx.kv
        sizes = {kv.index.block_size.get(w.worker_id) for w in candidates} if kv else set()
        misses: tuple[list[int], list[int]] = ([], [0] * len(candidates))
        if kv is None or sizes == {None}:
            return misses
        size = max(s for s in sizes if s is not None)  # one model: one block size
        now = kv.clock()
        # The first block first: a prompt nobody holds the start of is a miss everywhere,
        # and the rest of it need not be encoded (a long unique prompt: most of the cost).
        head = ctx.prompt_head(constants.KV_PROBE_CHARS)
        if head is None:
            return misses
        tokens, whole = head
        if not whole:
            first = block_keys(tokens[:size], size)
            settled = len(tokens) >= size + constants.KV_PROBE_MARGIN_TOKENS
            if settled and not any(kv.index.matched(w.worker_id, first, now) for w in candidates):
                return first, [0] * len(candidates)
            tokens = ctx.prompt_tokens or []
        keys = block_keys(tokens, size)
        return keys, [kv.index.matched(w.worker_id, keys, now) for w in candidates]

    def sent(self, worker: C, keys: list[int], ctx: RoutingContext) -> None:
        if ctx.kv is not None and keys:
            ctx.kv.index.note_sent(worker.worker_id, keys, ctx.kv.clock())

    def held_blocks(self, worker: C, ctx: RoutingContext) -> int:
        return ctx.kv.index.blocks(worker.worker_id) if ctx.kv is not None else 0


class PrefixTreePolicy(CacheAwarePolicy, name="prefix_tree"):
    """Cache-aware for engines without events (llama.cpp, attached servers): approximate.

    This gateway remembers which worker it sent each prompt prefix to (chunks of
    PREFIX_TREE_BLOCK_CHARS characters, chained, in a least-recently-used table of at most
    PREFIX_TREE_MAX_BLOCKS chunks) and assumes the worker still holds it. No tokenizer; each
    gateway has its own table, so several gateways agree less than with ``kv_events``.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._tree: OrderedDict[int, set[str]] = OrderedDict()
        self._held: dict[str, int] = {}

    def match(self, candidates: Sequence[C], ctx: RoutingContext) -> tuple[list[int], list[int]]:
        keys = text_block_keys(ctx.prompt_text, constants.PREFIX_TREE_BLOCK_CHARS)
        matched = []
        for worker in candidates:
            n = 0
            for key in keys:
                holders = self._tree.get(key)
                if holders is None or worker.worker_id not in holders:
                    break
                n += 1
            matched.append(n)
        return keys, matched

    def sent(self, worker: C, keys: list[int], ctx: RoutingContext) -> None:
        tree = self._tree
        worker_id = worker.worker_id
        for key in keys:
            holders = tree.get(key)
            if holders is None:
                holders = tree[key] = set()
            else:
                tree.move_to_end(key)
            if worker_id not in holders:
                holders.add(worker_id)
                self._held[worker_id] = self._held.get(worker_id, 0) + 1
        while len(tree) > constants.PREFIX_TREE_MAX_BLOCKS:
            _, gone = tree.popitem(last=False)
            for held in gone:
                self._held[held] -= 1

    def held_blocks(self, worker: C, ctx: RoutingContext) -> int:
        return self._held.get(worker.worker_id, 0)
