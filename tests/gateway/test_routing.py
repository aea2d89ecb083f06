"""Routing policies are pure: plain objects in, a worker out."""

from __future__ import annotations

import random
from collections import Counter

from fleetserve.kvblocks import block_keys
from fleetserve.protocol import WorkerLoad, WorkerView
from gateway.kvindex import KvEvents
from gateway.routing import (
    KvEventsPolicy,
    LeastLoadPolicy,
    PowerOfTwoPolicy,
    PrefixAffinityPolicy,
    PrefixTreePolicy,
    RoundRobinPolicy,
    RoutingContext,
    RoutingPolicy,
    SessionPolicy,
)


def _view(worker_id: str, waiting: int = 0, capacity: int = 8) -> WorkerView:
    return WorkerView(
        worker_id=worker_id,
        model_names=["m"],
        base_url="http://h/v1",
        engine="fake",
        capacity=capacity,
        load=WorkerLoad(waiting=waiting),
        last_heartbeat_age_s=0,
    )


def test_policies_register_by_name_with_one_default() -> None:
    assert set(RoutingPolicy.registry) == {
        "least_load",
        "round_robin",
        "power_of_two",
        "prefix_affinity",
        "session",
        "kv_events",
        "prefix_tree",
    }
    assert RoutingPolicy.default_name == "least_load"


def test_least_load_counts_in_flight_and_reported_waiting() -> None:
    policy = LeastLoadPolicy(random.Random(0))
    a, b = _view("a"), _view("b", waiting=2)
    assert policy.pick([a, b], RoutingContext(in_flight={"a": 1})) is a
    assert policy.pick([a, b], RoutingContext(in_flight={"a": 3})) is b
    # relative to capacity: 4 of 16 is less loaded than 3 of 8
    big = _view("big", capacity=16)
    assert policy.pick([_view("a"), big], RoutingContext(in_flight={"a": 3, "big": 4})) is big


def test_least_load_breaks_ties_at_random() -> None:
    policy = LeastLoadPolicy(random.Random(1))
    workers = [_view("a"), _view("b"), _view("c")]
    picks = Counter(policy.pick(workers, RoutingContext()).worker_id for _ in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


def test_round_robin_takes_turns() -> None:
    policy = RoundRobinPolicy()
    workers = [_view("b"), _view("a")]
    assert [policy.pick(workers, RoutingContext()).worker_id for _ in range(4)] == [
        "a",
        "b",
        "a",
        "b",
    ]


def test_power_of_two_takes_the_less_loaded_of_two() -> None:
    policy = PowerOfTwoPolicy(random.Random(2))
    a, b = _view("a"), _view("b")
    ctx = RoutingContext(in_flight={"a": 5})
    assert all(policy.pick([a, b], ctx) is b for _ in range(20))  # with two, both are drawn
    assert policy.pick([a], ctx) is a


def _chat(system: str, user: str = "hi") -> dict[str, object]:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_prefix_affinity_keeps_a_prefix_on_one_worker_and_spreads_prefixes() -> None:
    policy = PrefixAffinityPolicy()
    workers = [_view(name) for name in "abcd"]
    homes = {}
    for i in range(40):
        system = f"You are assistant number {i}. " * 20
        picks = {
            policy.pick(workers, RoutingContext(payload=_chat(system, f"q{j}"))).worker_id
            for j in range(5)
        }
        assert len(picks) == 1  # same prefix, different questions: one worker
        homes[i] = picks.pop()
    assert len(set(homes.values())) == 4  # 40 prefixes use every worker
    completion = RoutingContext(payload={"prompt": "You are assistant number 1. " * 20})
    assert completion.prefix.startswith("You are assistant number 1.")


def test_a_hot_prefix_spills_once_its_worker_is_loaded() -> None:
    policy = PrefixAffinityPolicy()
    workers = [_view(name) for name in "abcd"]
    payload = _chat("the same long system prompt " * 20)
    home = policy.pick(workers, RoutingContext(payload=payload)).worker_id
    in_flight = {home: 4}  # bound: max(ceil(1.25 * 5 / 4), 4) = 4, and this would be the 5th
    spilled = policy.pick(workers, RoutingContext(in_flight=in_flight, payload=payload))
    assert spilled.worker_id != home
    assert (
        policy.pick(workers, RoutingContext(in_flight={home: 3}, payload=payload)).worker_id == home
    )


def test_session_affinity_by_session_and_least_load_without() -> None:
    policy = SessionPolicy()
    workers = [_view(name) for name in "abc"]
    for user in ("alice", "bob", "carol"):
        first = policy.pick(workers, RoutingContext(session=user))
        loaded = {first.worker_id: 10}
        assert policy.pick(workers, RoutingContext(in_flight=loaded, session=user)) is first
    ctx = RoutingContext(in_flight={"a": 1, "b": 1})
    assert policy.pick(workers, ctx).worker_id == "c"


class _Tokenizer:
    """Stands in for gateway/tokenize.py's PromptTokenizer: one token per character."""

    def prompt(self, payload: dict[str, object]) -> tuple[str, bool]:
        return str(payload["prompt"]), True

    def encode(self, text: str, special: bool) -> list[int]:
        return [ord(c) for c in text]


def _kv(block_size: int = 4) -> KvEvents:
    kv = KvEvents()
    kv._tokenizers["m"] = _Tokenizer()  # type: ignore[assignment]
    for worker in "ab":
        kv.index.replace(worker, (), block_size)
    return kv


def _prompt_ctx(
    kv: KvEvents, prompt: str, in_flight: dict[str, int] | None = None
) -> RoutingContext:
    return RoutingContext(in_flight=in_flight or {}, payload={"prompt": prompt}, model="m", kv=kv)


def test_kv_events_goes_where_the_engine_holds_the_prefix() -> None:
    kv = _kv()
    a, b = _view("a"), _view("b")
    prompt = "0123456789abcdef" * 4  # 16 blocks of 4 tokens
    kv.index.store("b", block_keys([ord(c) for c in prompt[:48]], 4))  # 12 leading blocks
    policy = KvEventsPolicy(random.Random(0))
    ctx = _prompt_ctx(kv, prompt + "?")
    assert policy.pick([a, b], ctx) is b
    assert ctx.tokenize_s > 0  # tokenized once, and timed
    # a request queued in b's engine costs (mean cost + 1) blocks, a block to compute
    # CACHE_AWARE_MISS_WEIGHT: 12 cached blocks outweigh a few, not many
    assert policy.pick([a, b], _prompt_ctx(kv, prompt, {"b": 8})) is b
    assert policy.pick([a, b], _prompt_ctx(kv, prompt, {"b": 40})) is a


def test_kv_events_counts_what_it_just_sent_until_the_events_come() -> None:
    kv = _kv()
    a, b = _view("a"), _view("b")
    policy = KvEventsPolicy(random.Random(0))
    first = policy.pick([a, b], _prompt_ctx(kv, "a new shared system prompt, long" * 4 + "q1"))
    # the engine has not said anything yet; the next request with that prefix follows anyway
    for question in ("q2", "q3", "q4"):
        ctx = _prompt_ctx(kv, "a new shared system prompt, long" * 4 + question)
        assert policy.pick([a, b], ctx) is first


def test_kv_events_is_least_load_without_tokenizer_or_shared_prefix() -> None:
    kv = _kv()
    a, b = _view("a"), _view("b")
    policy = KvEventsPolicy(random.Random(0))
    no_tokenizer = RoutingContext(
        in_flight={"a": 1}, payload={"prompt": "x" * 64}, model="other", kv=kv
    )
    assert policy.pick([a, b], no_tokenizer) is b
    assert no_tokenizer.tokenize_s == 0
    picks = Counter(
        policy.pick([a, b], _prompt_ctx(kv, f"{i} unique prompt {i}" * 3)).worker_id
        for i in range(200)
    )
    assert min(picks.values()) > 60  # nothing shared: spread like least load


def test_policies_that_do_not_need_tokens_never_tokenize() -> None:
    kv = _kv()
    for policy in (LeastLoadPolicy(), PrefixAffinityPolicy(), PrefixTreePolicy(), SessionPolicy()):
        ctx = _prompt_ctx(kv, "some prompt " * 10)
        policy.pick([_view("a"), _view("b")], ctx)
        assert "prompt_tokens" not in vars(ctx) and ctx.tokenize_s == 0


def test_prefix_tree_keeps_prefixes_home_and_spreads_new_ones() -> None:
    policy = PrefixTreePolicy(random.Random(0))
    workers = [_view(name) for name in "abcd"]
    homes = {}
    in_flight: dict[str, int] = {}
    for i in range(40):
        system = f"You are assistant number {i}. " * 20
        home = policy.pick(workers, RoutingContext(in_flight=in_flight, payload=_chat(system)))
        in_flight[home.worker_id] = in_flight.get(home.worker_id, 0) + 1  # they stay busy
        homes[i] = home.worker_id
    assert Counter(homes.values()) == {w: 10 for w in "abcd"}  # new prefixes: least load
    for i in range(40):
        system = f"You are assistant number {i}. " * 20
        ctx = RoutingContext(in_flight=in_flight, payload=_chat(system, "another question"))
        assert policy.pick(workers, ctx).worker_id == homes[i]


def test_kv_events_encodes_only_the_head_of_a_long_prompt_nobody_holds() -> None:
    kv = _kv()
    a, b = _view("a"), _view("b")
    policy = KvEventsPolicy(random.Random(0))
    long_prompt = "a long prompt nobody sent before " * 100  # 3300 characters
    ctx = _prompt_ctx(kv, long_prompt)
    policy.pick([a, b], ctx)
    assert "prompt_tokens" not in vars(ctx)  # the head said: a miss everywhere
    # the same prompt again: its first block is now pending where it went; encoded whole
    again = _prompt_ctx(kv, long_prompt)
    first = policy.pick([a, b], again)
    assert "prompt_tokens" in vars(again)
    assert policy.pick([a, b], _prompt_ctx(kv, long_prompt)) is first
