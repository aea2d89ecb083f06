"""Every cluster-file field is honoured or refused, by name and with a reason, on each target."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetserve.cli.cluster import ClusterConfig, parse_cluster
from fleetserve.cli.targets import TABLES, Target, check, refusals
from fleetserve.errors import ConfigError
from tests.helpers import up_refuses


@pytest.mark.parametrize("part", list(TABLES), ids=lambda part: part.__name__)
def test_every_field_is_classified_for_every_target(part: type) -> None:
    assert set(TABLES[part]) == set(part.model_fields), (
        "classify the field in fleetserve/cli/targets.py"
    )
    for name, refused in TABLES[part].items():
        for target, why in refused.items():
            assert isinstance(target, Target) and len(why) > 20, (name, target)


def _cluster(**model: object) -> ClusterConfig:
    spec = {"name": "m", "engine": "fake", **model}
    return parse_cluster({"models": [spec]}, origin="test")


def test_a_file_of_defaults_runs_everywhere() -> None:
    for target in Target:
        assert refusals(_cluster(), target) == []


def test_autoscaling_is_refused_by_name_where_nothing_would_scale() -> None:
    cluster = _cluster(autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert refusals(cluster, Target.RAY) == []
    for target in (Target.LOCAL, Target.SKYPILOT, Target.SKYSERVE):
        (line,) = refusals(cluster, target)
        assert line.startswith("models[0].autoscaling: ")
    with pytest.raises(ConfigError, match=r"skyserve cannot do:\n  models\[0\].autoscaling: Sky"):
        check(cluster, Target.SKYSERVE, "cluster.yaml")


def test_one_refusal_per_field_with_its_place_in_the_file() -> None:
    cluster = parse_cluster(
        {
            "gateway": {"processes": 2, "host": "0.0.0.0"},
            "models": [
                {"name": "a", "engine": "fake"},
                {"name": "b", "engine": "fake", "autoscaling": {"max_replicas": 2}},
            ],
        },
        origin="test",
    )
    found = [line.split(":")[0] for line in refusals(cluster, Target.SKYPILOT)]
    assert found == ["gateway.host", "models[1].autoscaling"]
    found = [line.split(":")[0] for line in refusals(cluster, Target.KUBERNETES)]
    assert found == ["gateway.host", "gateway.processes"]


def test_up_refuses_a_field_it_cannot_honour_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "models: [{name: a, engine: fake, autoscaling: {min_replicas: 1, max_replicas: 3}}]\n"
    )
    result = up_refuses(path)
    assert result.returncode == 1, result.stderr
    assert "asks for what local cannot do" in result.stderr
    assert "models[0].autoscaling: `fleetserve up` runs on one machine" in result.stderr
