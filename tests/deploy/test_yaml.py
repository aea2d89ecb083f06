"""deploy/*.yaml as SkyPilot reads them, and what their scripts ask fleetserve to start.

The scripts' decisions (device, TP, replicas per node, which node runs what) are
checked with a stand-in `.venv/bin/fleetserve` that records its calls, for GPU
nodes this machine does not have; test_run.py runs them for real on its CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import WORKER_REQUIRED_ENV
from tests.deploy.skypilot import DEPLOY, LAUNCH_SECRETS, YAMLS, load_tasks, skypilot_env


def test_every_yaml_is_parsed(tasks: dict[str, dict[str, Any]]) -> None:
    assert sorted(tasks) == sorted(YAMLS)
    for name, task in tasks.items():
        assert task["workdir"] == ".", f"{name}: setup installs fleetserve from the synced repo"
        assert "scripts/setup.sh" in task["setup"], name
        assert task["secrets"]["HF_TOKEN"] == "", f"{name}: the HF token is a secret"
        assert not set(task["secrets"]) & set(task["envs"]), name
        for option in task["resources"]:
            ((gpu, count),) = option["accelerators"].items()
            assert count >= 1, f"{name}: {gpu}:{count}"


@pytest.mark.parametrize("name", ["serve.yaml", "service.yaml", "cluster.yaml"])
def test_gateway_port_is_open_and_the_one_the_gateway_uses(
    tasks: dict[str, dict[str, Any]], name: str
) -> None:
    task = tasks[name]
    for option in task["resources"]:
        assert option["ports"] == [task["envs"]["GATEWAY_PORT"]]
    assert '--port "$GATEWAY_PORT"' in task["run"]


def test_serve_yaml_is_one_node_of_a100s_with_alternatives(
    tasks: dict[str, dict[str, Any]],
) -> None:
    task = tasks["serve.yaml"]
    assert task["num_nodes"] == 1
    choices = [option["accelerators"] for option in task["resources"]]
    assert choices[0] == {"A100": 4} and len(choices) > 1  # the default first, then others
    assert {"MODEL", "SERVED_NAME", "TP_SIZE", "ENGINE"} <= set(task["envs"])


def test_service_yaml_is_a_skyserve_service_probed_with_a_one_token_request(
    tasks: dict[str, dict[str, Any]],
) -> None:
    task = tasks["service.yaml"]
    service = task["service"]
    probe = service["readiness_probe"]
    assert probe["path"] == "/v1/completions"
    # SkyPilot filled the served name in: the probe asks for the model the replica serves.
    assert probe["post_data"]["model"] == task["envs"]["SERVED_NAME"]
    assert probe["post_data"]["max_tokens"] == 1
    policy = service["replica_policy"]
    assert 1 <= policy["min_replicas"] < policy["max_replicas"]
    assert policy["target_qps_per_replica"] > 0
    assert all(option["use_spot"] for option in task["resources"])
    assert policy["dynamic_ondemand_fallback"] is True  # on-demand stands in for lost spot


@pytest.mark.parametrize(
    ("name", "required"),
    [
        ("serve.yaml", {"API_KEY"}),
        ("service.yaml", {"API_KEY"}),
        ("cluster.yaml", {"API_KEY", "FLEETSERVE_CLUSTER_TOKEN"}),
        ("worker.yaml", {"FLEETSERVE_CLUSTER_TOKEN"}),
    ],
)
def test_endpoints_need_an_api_key_and_clusters_a_token(name: str, required: set[str]) -> None:
    """Secrets without a value: SkyPilot launches only with `--secret NAME` (never an env, which
    `sky status` and the dashboard show)."""
    secrets = yaml.safe_load((DEPLOY / name).read_text())["secrets"]
    assert {key for key, value in secrets.items() if value is None} == required


def test_the_readiness_probe_sends_the_api_key(tasks: dict[str, dict[str, Any]]) -> None:
    probe = tasks["service.yaml"]["service"]["readiness_probe"]
    assert probe["headers"] == {"Authorization": f"Bearer {LAUNCH_SECRETS['API_KEY']}"}


def test_the_api_key_reaches_fleetserve_on_stdin_only(
    tasks: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    for name in ("serve.yaml", "service.yaml", "cluster.yaml"):
        calls = _calls(tasks[name], tmp_path / name, rank=0, keys=True)
        (key,) = [c for c in calls if c["argv"][0] == "key"]
        assert key["argv"][:2] == ["key", "hash"] and key["stdin"] == LAUNCH_SECRETS["API_KEY"]
        (gateway,) = [c for c in calls if c["argv"][0] in ("up", "gateway")]
        assert _flags(gateway["argv"])["keys-file"].endswith("gateway-keys.yaml")
        for call in calls:
            assert not {LAUNCH_SECRETS["API_KEY"], LAUNCH_SECRETS["FLEETSERVE_CLUSTER_TOKEN"]} & {
                *call["argv"]
            }, call


def test_cluster_yaml_has_several_nodes_on_the_clouds_best_network(
    tasks: dict[str, dict[str, Any]],
) -> None:
    """Pipeline stages across nodes exchange activations over NCCL: EFA on AWS, GPUDirect on
    GCP, InfiniBand where the cloud has it (SkyPilot's network_tier: best)."""
    assert tasks["cluster.yaml"]["num_nodes"] >= 2
    assert {r["network_tier"] for r in tasks["cluster.yaml"]["resources"]} == {"best"}


def test_worker_yaml_needs_a_controller_and_a_model(sky_home: Path) -> None:
    with pytest.raises(AssertionError, match="'CONTROLLER_URL' is None"):
        load_tasks([DEPLOY / "worker.yaml"], sky_home)
    with pytest.raises(AssertionError, match="'MODEL' is None"):
        load_tasks([DEPLOY / "worker.yaml"], sky_home, {"CONTROLLER_URL": "http://h:8001"})


@pytest.mark.parametrize(
    ("right", "wrong", "message"),
    [
        ("resources:", "resorces:", "did you mean 'resources'"),
        ("  accelerators:", "  acelerators:", "did you mean 'accelerators'"),
        (
            "    min_replicas:",
            "    min_replica:",
            "Invalid service YAML: .min_replicas. is a required",
        ),
    ],
)
def test_a_misspelled_key_fails_with_skypilots_message(
    sky_home: Path, tmp_path: Path, right: str, wrong: str, message: str
) -> None:
    text = (DEPLOY / "service.yaml").read_text()
    assert text.count(right) == 1
    broken = tmp_path / "service.yaml"
    broken.write_text(text.replace(right, wrong))
    with pytest.raises(AssertionError, match=message) as failure:
        load_tasks([broken], sky_home)
    assert "SkyPilot rejected the YAML" in str(failure.value)


# The scripts' decisions, with a stand-in fleetserve.

# One write per call on an O_APPEND file: workers started in parallel record whole lines
# (print() under PYTHONUNBUFFERED writes the newline apart, and lines interleaved in CI).
_RECORDING_FLEETSERVE = """#!/usr/bin/env bash
python3 -c 'import json, os, sys
call = {"argv": sys.argv[1:], "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
if sys.argv[1] == "key":
    call["stdin"] = sys.stdin.read()
fd = os.open(os.environ["FLEETSERVE_CALLS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, (json.dumps(call) + "\\n").encode())' "$@"
"""


def _calls(
    task: dict[str, Any], tmp_path: Path, expect_rc: int = 0, keys: bool = False, **node: Any
) -> list[dict[str, Any]]:
    """Run ``task``'s run script on one node with a recording fleetserve; its calls, sorted
    (``keys``: with the `fleetserve key` calls that write the gateway's keys file)."""
    workdir = tmp_path / f"node-{node.get('rank', 0)}"
    stub = workdir / ".venv" / "bin" / "fleetserve"
    stub.parent.mkdir(parents=True)
    stub.write_text(_RECORDING_FLEETSERVE)
    stub.chmod(0o755)
    calls = workdir / "calls.jsonl"
    overrides = {k: str(v) for k, v in node.pop("env", {}).items()}
    env = skypilot_env(task, dict(os.environ), **node, **overrides)
    env["FLEETSERVE_CALLS"] = str(calls)
    env["FLEETSERVE_HOME"] = str(workdir / "fleetserve-home")  # the keys file goes there
    done = subprocess.run(
        ["bash", "-c", task["run"]], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert done.returncode == expect_rc, done.stderr
    if not calls.exists():
        return []
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    records = [r for r in records if keys or r["argv"][0] != "key"]
    return sorted(records, key=lambda r: (r["argv"][0], r["gpus"] or ""))


def _flags(argv: list[str]) -> dict[str, str]:
    """``["up", "--source", "m", "--", "--x"]`` -> ``{"source": "m"}`` (engine flags dropped)."""
    if "--" in argv:
        argv = argv[: argv.index("--")]
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            flags[arg[2:]] = value
    return flags


@pytest.mark.parametrize("name", ["serve.yaml", "service.yaml"])
@pytest.mark.parametrize(
    ("gpus", "tp_size", "device", "tp"),
    [(4, "", "cuda", "4"), (8, "2", "cuda", "2"), (0, "", "cpu", "1")],
)
def test_one_node_runs_up_over_every_gpu(
    tasks: dict[str, dict[str, Any]],
    tmp_path: Path,
    name: str,
    gpus: int,
    tp_size: str,
    device: str,
    tp: str,
) -> None:
    task = tasks[name]
    env = {"TP_SIZE": tp_size, "ENGINE_ARGS": "--max-model-len 4096"}
    (call,) = _calls(task, tmp_path, gpus=gpus, env=env)
    argv = call["argv"]
    assert argv[0] == "up"
    flags = _flags(argv)
    assert flags["device"] == device and flags["tensor-parallel-size"] == tp
    assert flags["source"] == task["envs"]["MODEL"] and flags["name"] == task["envs"]["SERVED_NAME"]
    assert flags["host"] == "0.0.0.0" and flags["port"] == task["envs"]["GATEWAY_PORT"]
    assert "replicas" not in flags  # `up` fits as many as the GPUs hold
    # what `up` refuses is what this target cannot honour (fleetserve/cli/targets.py)
    assert flags["target"] == {"serve.yaml": "skypilot", "service.yaml": "skyserve"}[name]
    assert argv[argv.index("--") + 1 :] == ["--max-model-len", "4096"]


_IPS = ("10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8")


def test_cluster_head_runs_up_and_other_nodes_fill_their_gpus_with_workers(
    tasks: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    task = tasks["cluster.yaml"]
    env = {"TP_SIZE": 4}
    (head,) = _calls(task, tmp_path, rank=0, ips=_IPS, gpus=8, env=env)
    assert head["argv"][0] == "up"
    assert _flags(head["argv"])["advertise-host"] == _IPS[0]
    assert _flags(head["argv"])["tensor-parallel-size"] == "4"
    assert _flags(head["argv"])["target"] == "skypilot"
    workers = _calls(task, tmp_path, rank=2, ips=_IPS, gpus=8, env=env)
    assert [w["gpus"] for w in workers] == ["0,1,2,3", "4,5,6,7"]  # 8 GPUs, TP 4: two replicas
    for worker in workers:
        flags = _flags(worker["argv"])
        assert worker["argv"][0] == "worker"
        assert flags["controller-url"] == f"http://{_IPS[0]}:{task['envs']['CONTROLLER_PORT']}"
        assert flags["advertise-host"] == _IPS[2] and flags["tensor-parallel-size"] == "4"


def test_cluster_replicas_span_nodes_with_pipeline_parallel(
    tasks: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    task = tasks["cluster.yaml"]
    env = {"PP_SIZE": 2}
    head = _calls(task, tmp_path, rank=0, ips=_IPS, gpus=8, env=env)
    assert [c["argv"][0] for c in head] == ["controller", "gateway", "worker"]
    (last,) = _calls(task, tmp_path, rank=3, ips=_IPS, gpus=8, env=env)
    # 4 nodes, 2 per replica: ranks 0-1 are the first replica, ranks 2-3 the second.
    for call, group, node_rank in ((head[2], _IPS[:2], "0"), (last, _IPS[2:], "1")):
        flags = _flags(call["argv"])
        assert flags["nodes"] == ",".join(group) and flags["node-rank"] == node_rank
        assert flags["pipeline-parallel-size"] == "2"
        assert flags["ray-port"] == task["envs"]["RAY_PORT"]
        assert flags["tensor-parallel-size"] == "8"  # TP over each node's GPUs
    assert _flags(head[1]["argv"])["port"] == task["envs"]["GATEWAY_PORT"]
    odd = _calls(task, tmp_path / "odd", rank=1, ips=_IPS, gpus=8, env={"PP_SIZE": 3}, expect_rc=2)
    assert odd == []


def test_worker_yaml_registers_with_the_given_controller(
    tasks: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    task = tasks["worker.yaml"]
    (call,) = _calls(task, tmp_path, rank=0, ips=("10.1.0.9",), gpus=8)
    flags = _flags(call["argv"])
    assert call["argv"][0] == "worker" and call["gpus"] == "0,1,2,3,4,5,6,7"
    assert flags["controller-url"] == WORKER_REQUIRED_ENV["CONTROLLER_URL"]
    assert flags["source"] == WORKER_REQUIRED_ENV["MODEL"]
    assert flags["served-name"] == "qwen2.5-32b"  # MODEL's last part, lower case
    assert flags["advertise-host"] == "10.1.0.9" and flags["tensor-parallel-size"] == "8"


@pytest.mark.parametrize(
    ("pp_size", "cluster_file", "flags"),
    [
        ("1", "", []),
        ("2", "", ["--ray"]),
        ("1", "models: [{name: a, engine: fake}]", []),
        ("1", "models: [{name: a, pipeline_parallel_size: 2, nodes: 2}]", ["--ray"]),
    ],
)
def test_cluster_setup_installs_ray_for_replicas_spanning_nodes(
    tasks: dict[str, dict[str, Any]],
    tmp_path: Path,
    pp_size: str,
    cluster_file: str,
    flags: list[str],
) -> None:
    stub = tmp_path / "scripts" / "setup.sh"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "$@" > "$SETUP_CALL"\n')
    stub.chmod(0o755)
    puller = tmp_path / ".venv" / "bin" / "fleetserve"  # `model pull -f`: nothing to pull here
    puller.parent.mkdir(parents=True)
    puller.write_text("#!/usr/bin/env bash\n")
    puller.chmod(0o755)
    task = tasks["cluster.yaml"]
    # ENGINE fake: no weights to pull (test_run.py pulls them from a fake hub)
    path = tmp_path / "cluster.yaml"
    path.write_text(cluster_file)
    env = skypilot_env(
        task,
        dict(os.environ),
        PP_SIZE=pp_size,
        ENGINE="fake",
        CLUSTER_FILE=str(path) if cluster_file else "",
    )
    env["SETUP_CALL"] = str(tmp_path / "call")
    done = subprocess.run(["bash", "-c", task["setup"]], cwd=tmp_path, env=env)
    assert done.returncode == 0
    assert (tmp_path / "call").read_text().split() == flags


def test_run_scripts_are_valid_bash(tasks: dict[str, dict[str, Any]]) -> None:
    for name, task in tasks.items():
        for section in ("setup", "run"):
            done = subprocess.run(["bash", "-n", "-c", task[section]], capture_output=True)
            assert done.returncode == 0, f"{name} {section}: {done.stderr.decode()}"
