"""The gateway's routing table as it is built from the controller's: plain objects, no network."""

from __future__ import annotations

import pytest

from fleetserve.protocol import ModelView, RouteTable, WorkerState, WorkerView
from gateway.routing import (
    KvEventsPolicy,
    LeastLoadPolicy,
    PrefixTreePolicy,
    RoundRobinPolicy,
    SessionPolicy,
)
from gateway.table import RoutingTable, Upstream, response_tag


def _worker(worker_id: str, *names: str, state: WorkerState = WorkerState.READY) -> WorkerView:
    return WorkerView(
        worker_id=worker_id,
        model_names=list(names),
        base_url=f"http://10.0.0.{len(worker_id)}:8{len(worker_id)}00/v1",
        engine="fake",
        capacity=4,
        state=state,
        last_heartbeat_age_s=0,
    )


def _table(version: int, workers: list[WorkerView], **policies: str | None) -> RouteTable:
    models = [ModelView(name=name, routing_policy=policy) for name, policy in policies.items()]
    return RouteTable(epoch="e", version=version, workers=workers, models=models)


def test_one_entry_per_model_shared_by_its_aliases_with_parsed_targets() -> None:
    table = RoutingTable(
        _table(1, [_worker("a", "m", "alias"), _worker("bb", "m", "alias")], m="round_robin")
    )
    model, alias = table.by_name["m"], table.by_name["alias"]
    assert model.policy is alias.policy and isinstance(model.policy, RoundRobinPolicy)
    assert model.workers is alias.workers  # one tuple of targets, parsed once
    assert [(t.host, t.port, t.path_prefix) for t in model.workers] == [
        ("10.0.0.1", 8100, ""),
        ("10.0.0.2", 8200, ""),
    ]


def test_policies_survive_new_versions_until_the_model_changes_policy() -> None:
    workers = [_worker("a", "m")]
    first = RoutingTable(_table(1, workers, m="round_robin"))
    same = RoutingTable(_table(2, workers, m="round_robin"), first)
    changed = RoutingTable(_table(3, workers, m="session"), same)
    assert same.by_name["m"].policy is first.by_name["m"].policy  # its counter goes on
    assert isinstance(changed.by_name["m"].policy, SessionPolicy)


def test_unknown_policy_or_none_is_the_default_and_draining_workers_are_not_routed() -> None:
    table = RoutingTable(
        _table(
            1,
            [_worker("a", "m"), _worker("bb", "m", state=WorkerState.DRAINING), _worker("c", "d")],
            m="no-such-policy",
            d=None,
        )
    )
    assert isinstance(table.by_name["m"].policy, LeastLoadPolicy)
    assert isinstance(table.by_name["d"].policy, LeastLoadPolicy)
    assert [t.worker_id for t in table.by_name["m"].workers] == ["a"]


def test_a_model_whose_workers_all_drain_is_known_with_no_worker() -> None:
    table = RoutingTable(_table(1, [_worker("a", "m", state=WorkerState.DRAINING)]))
    assert table.by_name["m"].workers == ()  # 503 "no healthy worker", not 404
    assert RoutingTable().version is None and RoutingTable().by_name == {}


def test_each_route_knows_the_workers_that_serve_each_endpoint() -> None:
    chat, embed = "/v1/chat/completions", "/v1/embeddings"
    both = _worker("a", "m").model_copy(update={"endpoints": [chat, embed]})
    chat_only = _worker("bb", "m").model_copy(update={"endpoints": [chat]})
    route = RoutingTable(_table(1, [both, chat_only])).by_name["m"]
    assert route.endpoints == {chat, embed}
    assert route.by_endpoint[chat] is route  # every worker serves it: the route itself
    assert [t.worker_id for t in route.by_endpoint[embed].workers] == ["a"]
    assert route.by_endpoint[embed].policy is route.policy


def test_a_response_tag_finds_its_ready_worker() -> None:
    table = RoutingTable(_table(1, [_worker("a", "m", "alias"), _worker("bb", "other")]))
    route, target = table.by_response_tag[response_tag("a")]
    assert (route.model, target.worker_id) == ("m", "a")
    assert len(response_tag("a")) == 12 and response_tag("a") != response_tag("bb")


def test_a_kept_model_routes_to_its_fallbacks_and_attached_servers_get_their_key() -> None:
    attached = _worker("up", "local").model_copy(
        update={"upstream_model": "theirs", "upstream_key": "KEY_A"}
    )
    lacking = _worker("up2", "local").model_copy(update={"upstream_key": "KEY_B"})
    models = [ModelView(name="gone", aliases=["gone-alias"], fallbacks=["local"])]
    table = RoutingTable(
        RouteTable(epoch="e", version=1, workers=[attached, lacking], models=models),
        secret={"KEY_A": "sk-a"}.get,
    )
    local = table.by_name["local"]
    assert [t.worker_id for t in local.workers] == ["up"]  # no KEY_B here: not routed to
    assert table.missing_secrets == {"up2"}
    assert local.upstreams["up"] == Upstream("theirs", b"Authorization: Bearer sk-a\r\n")
    for name in ("gone", "gone-alias"):
        kept = table.by_name[name]
        assert (kept.model, kept.workers, kept.fallbacks) == ("gone", (), ("local",))
        assert kept.endpoints == frozenset() and kept.by_endpoint == {}


def test_a_missing_secret_is_logged_once_not_at_every_version(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lacking = _worker("up", "local").model_copy(update={"upstream_key": "KEY_B"})
    first = RoutingTable(_table(1, [lacking]), secret=lambda _: None)
    again = RoutingTable(_table(2, [lacking]), first, secret=lambda _: None)
    RoutingTable(_table(3, [lacking]), again, secret=lambda _: None)
    assert caplog.text.count("needs the secret KEY_B") == 1


def test_a_model_whose_engines_publish_kv_events_routes_by_them_unless_told_otherwise() -> None:
    publishing = _worker("a", "m").model_copy(update={"kv_events_url": "http://10.0.0.1:9000"})
    workers = [publishing, _worker("bb", "plain")]
    table = RoutingTable(_table(1, workers, m=None, plain=None))
    assert isinstance(table.by_name["m"].policy, KvEventsPolicy)
    assert isinstance(table.by_name["plain"].policy, LeastLoadPolicy)
    # the gateway's --routing-policy, for models that name none
    gateway_default = RoutingTable(
        _table(1, workers, m=None, plain=None), None, default_policy="prefix_tree"
    )
    assert isinstance(gateway_default.by_name["m"].policy, PrefixTreePolicy)
    assert isinstance(gateway_default.by_name["plain"].policy, PrefixTreePolicy)
    # the registration's own choice wins
    named = RoutingTable(
        _table(1, workers, m="session", plain=None), None, default_policy="prefix_tree"
    )
    assert isinstance(named.by_name["m"].policy, SessionPolicy)


def _lora_worker(worker_id: str, device: str, *adapters: str) -> WorkerView:
    return _worker(worker_id, "base", "b-alias").model_copy(
        update={
            "device": device,
            "max_adapters": 2,
            "adapters": list(adapters),
            "base_requests": device != "cpu" or not adapters,  # as its agent reports
        }
    )


def _lora_table(*workers: WorkerView) -> RoutingTable:
    adapter = ModelView(name="a", aliases=["a-alias"], declared=True, base="base")
    other = ModelView(name="gone", declared=True, base="base")
    return RoutingTable(
        RouteTable(epoch="e", version=1, workers=list(workers), models=[adapter, other])
    )


def test_an_adapter_routes_to_the_replicas_of_its_base_that_registered_it() -> None:
    table = _lora_table(_lora_worker("w1", "cuda", "a"), _lora_worker("w2", "cuda"))
    adapter, alias = table.by_name["a"], table.by_name["a-alias"]
    assert [t.worker_id for t in adapter.workers] == ["w1"] and alias.workers == adapter.workers
    assert adapter.base == "base" and adapter.declared and adapter.model == "a"
    assert adapter.endpoints == table.by_name["base"].endpoints
    # registered nowhere: no worker, declared, so requests are held while one loads it
    assert table.by_name["gone"].workers == () and table.by_name["gone"].declared
    # GPUs: the base's own requests go to every replica
    assert len(table.by_name["base"].workers) == 2


def test_the_bases_requests_go_only_to_replicas_that_take_them() -> None:
    table = _lora_table(_lora_worker("w1", "cpu", "a"), _lora_worker("w2", "cpu"))
    for name in ("base", "b-alias"):
        assert [t.worker_id for t in table.by_name[name].workers] == ["w2"]
    assert [t.worker_id for t in table.by_name["a"].workers] == ["w1"]
    # none takes them (one replica, with adapters): every one, the documented limit
    table = _lora_table(_lora_worker("w1", "cpu", "a"), _lora_worker("w2", "cpu", "gone"))
    assert len(table.by_name["base"].workers) == 2
