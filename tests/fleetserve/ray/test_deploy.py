"""What `fleetserve ray deploy` asks Ray for, per model (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetserve.cli import main
from fleetserve.cli.cluster import parse_cluster
from fleetserve.errors import ConfigError
from fleetserve.ray.deploy import deployment_options


def options(
    model: dict[str, object], gpus: bool = True, controller_url: str | None = None
) -> dict[str, object]:
    (spec,) = parse_cluster({"models": [{"name": "m", **model}]}).models
    return deployment_options(spec, gpus, controller_url)


def resources(model: dict[str, object], gpus: bool = True) -> tuple[object, object]:
    actor = options(model, gpus)["ray_actor_options"]
    assert isinstance(actor, dict)
    return actor["num_gpus"], actor["num_cpus"]


def test_a_replica_holds_the_gpus_of_its_tensor_parallel_group() -> None:
    assert resources({"tensor_parallel_size": 4}) == (4, 0)
    assert resources({"tensor_parallel_size": 2}, gpus=False) == (0, 2)  # CPU build: cores
    assert resources({"engine": "fake"}) == (0, 0)
    # stages on other nodes: vLLM's Ray executor reserves a GPU per rank itself
    assert resources({"tensor_parallel_size": 8, "pipeline_parallel_size": 2}) == (0, 0)


def test_fixed_replicas_or_autoscaling_bounds() -> None:
    assert options({"replicas": 3})["num_replicas"] == 3
    scaled = options({"autoscaling": {"min_replicas": 1, "max_replicas": 4}})
    assert "num_replicas" not in scaled
    config = scaled["autoscaling_config"]
    assert isinstance(config, dict)
    assert (config["min_replicas"], config["max_replicas"]) == (1, 4)
    assert config["policy"] == {
        "policy_function": "fleetserve.ray.autoscaling:ServePolicy",
        "policy_kwargs": {},
    }


def test_scaled_to_zero_models_read_the_gateways_demand_from_the_controller() -> None:
    """min_replicas 0 starts none; the policy is told where the demand is (no secret: Serve
    logs its kwargs). load: on_demand is the same, from 0 to its replicas, going back to 0
    after idle_timeout_s."""
    url = "http://controller:8001"
    for model, bounds, to_zero in [
        ({"autoscaling": {"min_replicas": 0, "max_replicas": 3}}, (0, 0, 3), None),
        ({"load": "on_demand", "replicas": 2, "idle_timeout_s": 60}, (0, 0, 2), 60),
    ]:
        config = options(model, controller_url=url)["autoscaling_config"]
        assert isinstance(config, dict)
        got = (config["min_replicas"], config["initial_replicas"], config["max_replicas"])
        assert got == bounds
        assert config.get("downscale_to_zero_delay_s") == to_zero
        assert config["policy"]["policy_kwargs"] == {
            "model": "m",
            "controller_url": url,
            "min_replicas": 0,
            "ca_file": None,
        }
    (spec,) = parse_cluster(
        {"models": [{"name": "m", "autoscaling": {"min_replicas": 0, "max_replicas": 3}}]}
    ).models
    assert spec.declaration().replicas == 0  # gateways hold its requests and ask for one


@pytest.mark.parametrize(
    ("autoscaling", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas (3) is more than max_replicas (2)"),
        ({"max_replicas": 2, "look_back_period_s": 1}, "look_back_period_s: Input should be"),
        ({"min_replicas": 1}, "max_replicas: Field required"),
    ],
)
def test_bad_autoscaling_is_refused(autoscaling: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cluster({"models": [{"name": "m", "autoscaling": autoscaling}]})


@pytest.mark.ray
def test_no_ray_cluster_at_the_address_fails_fast_and_says_so(fleet_env: dict[str, str]) -> None:
    import subprocess
    import sys

    from tests.helpers import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "ray", "status", "--address", address],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=60,  # ray.init alone would retry for minutes
    )
    assert done.returncode == 1
    assert f"no Ray cluster at {address}" in done.stderr
    assert "ray start --head" in done.stderr


def test_a_field_ray_cannot_honour_is_refused_by_name_before_reaching_ray(tmp_path: Path) -> None:
    """The Ray column of fleetserve/cli/targets.py, as `ray deploy` checks it: nothing is
    silently ignored (no Ray cluster is needed to be refused)."""
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "models:\n"
        "  - {name: big, source: org/big, gpu: {products: [NVIDIA-H100-80GB-HBM3]}}\n"
        "  - {name: ok, engine: fake}\n"
    )
    with pytest.raises(SystemExit) as exited:
        main(["ray", "deploy", "-f", str(path), "--address", "127.0.0.1:1"])
    message = str(exited.value.code)
    assert f"{path} asks for what ray cannot do" in message
    assert "models[0].gpu: Ray places replicas by GPU count only" in message
    assert "models[1]" not in message
