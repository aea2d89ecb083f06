"""The gateway's routing table as it is built from the controller's: plain objects, no network."""

from __future__ import annotations

from fleetserve.protocol import ModelView, RouteTable, WorkerState, WorkerView
from gateway.routing import (
    KvEventsPolicy,
    LeastLoadPolicy,
    PrefixTreePolicy,
    RoundRobinPolicy,
    SessionPolicy,
)
from gateway.table import RoutingTable


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


def test_a_model_whose_engines_publish_kv_events_routes_by_them_unless_told_otherwise() -> None:
    publishing = _worker("a", "m").model_copy(update={"kv_events_url": "http://10.0.0.1:9000"})
    workers = [publishing, _worker("bb", "plain")]
    table = RoutingTable(_table(1, workers, m=None, plain=None))
    assert isinstance(table.by_name["m"].policy, KvEventsPolicy)
    assert isinstance(table.by_name["plain"].policy, LeastLoadPolicy)
    # the gateway's --routing-policy, for models that name none
    gateway_default = RoutingTable(_table(1, workers, m=None, plain=None), None, "prefix_tree")
    assert isinstance(gateway_default.by_name["m"].policy, PrefixTreePolicy)
    assert isinstance(gateway_default.by_name["plain"].policy, PrefixTreePolicy)
    # the registration's own choice wins
    named = RoutingTable(_table(1, workers, m="session", plain=None), None, "prefix_tree")
    assert isinstance(named.by_name["m"].policy, SessionPolicy)
