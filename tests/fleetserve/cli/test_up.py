"""`fleetserve up`: the one command that runs a whole cluster on this machine."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from fleetserve.cli.harness import descendants, wait_until
from gateway.auth import hash_key
from tests.conftest import GGUF_NAME
from tests.helpers import RunningUp, running_up
from workers.inventory import discover_machine
from workers.llamacpp.source import server_binary

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _run_until_ready_then_interrupt(
    args: list[str],
    env: dict[str, str],
    log_dir: Path,
    model: str,
    timeout_s: float,
    api_key: str = "x",
) -> str:
    with running_up(args, env, log_dir, timeout_s) as up:
        client = up.client(api_key)
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        if api_key != "x":  # the cluster file's keys are in force
            wrong = up.client("wrong")
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}]
                )
        chunks = list(
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
            )
        )
        assert len(chunks) > 1
    text = up.text()
    assert f"http://127.0.0.1:{up.port}/v1" in text
    return text


def test_up_with_a_cluster_file(fleet_env: dict[str, str], log_dir: Path) -> None:
    cluster = log_dir / "cluster.yaml"
    cluster.write_text(
        f"gateway: {{keys: [{{name: me, key_sha256: {hash_key('sk-me')}}}]}}\n"
        "models:\n"
        "  - {name: echo, aliases: [e], engine: fake, replicas: 2}\n"
        "  - {name: other, engine: fake}\n"
    )
    text = _run_until_ready_then_interrupt(
        ["-f", str(cluster)], fleet_env, log_dir, "e", 60, api_key="sk-me"
    )
    assert text.count("ready echo") == 2 and "ready other" in text


@pytest.mark.vllm
def test_up_with_no_file_serves_the_demo_model_on_vllm(
    fleet_env: dict[str, str], tiny_model: Path, log_dir: Path
) -> None:
    """The README's first request, sent as soon as `up` prints its endpoint: held while vLLM
    loads the demo model (the gateway's default hold_timeout_s, 120 s, is more than its cold
    start here), then answered."""
    with running_up([], fleet_env, log_dir, 180, until="fleetserve gateway") as up:
        assert "ready tiny-llama" not in up.text()  # asked during start-up
        client = up.client().with_options(timeout=300)
        reply = client.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        chunks = list(
            client.chat.completions.create(
                model="tiny-llama",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
                stream=True,
            )
        )
        assert len(chunks) > 1
        wait_until(lambda: "ready tiny-llama (vllm)" in up.text(), 30, "the worker reported")
    assert f"http://127.0.0.1:{up.port}/v1" in up.text()


def test_up_with_one_model_on_the_command_line(fleet_env: dict[str, str], log_dir: Path) -> None:
    one_model = ["--source", "any-source", "--name", "echo", "--engine", "fake", "--replicas", "2"]
    text = _run_until_ready_then_interrupt(
        [*one_model, "--", "--tokens-per-s", "500"],
        fleet_env,
        log_dir,
        "echo",
        60,
    )
    assert text.count("ready echo (fake)") == 2
    worker_log = (log_dir / "worker-echo-0.log").read_text()
    assert "--tokens-per-s 500" in worker_log  # flags after `--` reach the engine


@pytest.mark.skipif(bool(discover_machine().gpus), reason="this machine has GPUs")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-f", str(EXAMPLES / "tensor-parallel.yaml")],
            "this machine has no GPU, and tiny-llama-tp2 asks for tensor_parallel_size 2. "
            "To run on vLLM's CPU build anyway (one core per rank; slow, for trying things "
            "out), add --device cpu.",
        ),
        (
            ["-f", str(EXAMPLES / "gpu-node.yaml")],
            "llama-3.1-8b asks for tensor_parallel_size 2; qwen2.5-32b asks for "
            "tensor_parallel_size 4",
        ),
        (["--device", "cuda"], "--device cuda: no GPU found on this machine"),
        (
            ["--source", "m", "--engine", "fake", "-f", "x.yaml"],
            "argument -f/--file: not allowed with argument --source/--model",
        ),
    ],
)
def test_up_without_gpus_refuses_what_needs_them(
    args: list[str], message: str, fleet_env: dict[str, str], tiny_model: Path
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetserve.cli",
            "up",
            *args,
            "--port",
            "1",
            "--log-dir",
            "/nonexistent",
        ],
        env=fleet_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert message in " ".join(done.stderr.split()), done.stderr
    assert "fleetserve gateway" not in done.stdout  # refused before anything started


def test_up_holds_the_first_requests_until_the_workers_are_ready(
    fleet_env: dict[str, str], log_dir: Path
) -> None:
    """The README's first request, made as soon as `up` prints its endpoint: held until the
    worker is ready (the fake engine 'loads' for a few seconds), not 404; a model that is
    still loading when the hold ends: 503 with Retry-After, saying it is starting; a typo:
    404."""
    cluster = log_dir / "cluster.yaml"
    cluster.write_text(
        "gateway: {hold_timeout_s: 30}\n"
        "models:\n"
        "  - {name: echo, engine: fake, engine_args: {load_s: 4}}\n"
        "  - {name: glacial, engine: fake, engine_args: {load_s: 600}}\n"
    )
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    # (generous deadlines: `up` starts slowly on a busy machine; they cost nothing otherwise)
    with running_up(
        ["-f", str(cluster)], fleet_env, log_dir, 180, until="fleetserve gateway"
    ) as up:
        client = up.client().with_options(timeout=120)
        assert "ready echo" not in up.text()  # asked during start-up
        with ThreadPoolExecutor(1) as pool:  # (held meanwhile: the two holds overlap)
            glacial = pool.submit(client.chat.completions.create, model="glacial", messages=hi)
            reply = client.chat.completions.create(model="echo", messages=hi, max_tokens=4)
            assert reply.choices[0].message.content
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="ecoh", messages=hi)
            listed = {m.id: (m.model_extra or {}).get("state") for m in client.models.list()}
            assert listed == {"echo": "ready", "glacial": "starting"}
            with pytest.raises(openai.InternalServerError) as starting:
                glacial.result()
        assert starting.value.status_code == 503
        assert "`glacial` is not ready (starting: 0 of 1 replicas ready)" in str(
            starting.value.message
        )
        assert int(starting.value.response.headers["retry-after"]) > 0


def _worker_processes(pid: int) -> list[str]:
    """The command lines of the worker processes (agents, engines) below ``pid``."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_text().replace("\0", " ")
        except FileNotFoundError:
            continue
        if " worker " in cmdline or "workers." in cmdline:
            found.append(cmdline)
    return found


def _status(up: RunningUp, env: dict[str, str]) -> str:
    """What `fleetserve status` prints for the cluster of ``up``."""
    controller_url = re.findall(r"controller: (\S+)", up.text())[0]
    status = [sys.executable, "-m", "fleetserve.cli", "status", "--controller-url", controller_url]
    return subprocess.run(status, env=env, capture_output=True, text=True, timeout=60).stdout


def test_up_starts_an_on_demand_model_on_its_first_requests_and_stops_it_when_idle(
    fleet_env: dict[str, str], log_dir: Path
) -> None:
    """Nothing runs after start; a burst of 20 concurrent first requests starts exactly one
    replica and all 20 are answered; after idle_timeout_s without a request the worker is
    gone (no process left), and the next request starts it again."""
    cluster = log_dir / "cluster.yaml"
    cluster.write_text(
        "load: on_demand\n"
        "idle_timeout_s: 10\n"  # (outlasts `fleetserve status` starting on a busy machine)
        "models:\n"
        "  - {name: echo, engine: fake, engine_args: {load_s: 2}}\n"
    )
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    on_demand = "every model is on demand"
    with running_up(["-f", str(cluster)], fleet_env, log_dir, 180, until=on_demand) as up:
        assert not _worker_processes(up.proc.pid)  # nothing runs before it is asked for
        client = up.client().with_options(timeout=120)
        assert {m.id: (m.model_extra or {}).get("state") for m in client.models.list()} == {
            "echo": "scaled_to_zero"
        }
        assert "│ echo  │ scaled_to_zero │ 0 " in _status(up, fleet_env)
        with ThreadPoolExecutor(20) as pool:
            replies = list(
                pool.map(
                    lambda _: client.chat.completions.create(
                        model="echo", messages=hi, max_tokens=4
                    ),
                    range(20),
                )
            )
        assert all(reply.choices[0].message.content for reply in replies)
        assert len({reply.id for reply in replies}) == 20
        assert up.text().count("on demand: starting echo") == 1
        engines = [  # (each under its reaper, whose command line names it too)
            c
            for c in _worker_processes(up.proc.pid)
            if c.split()[1:3] == ["-m", "workers.fake.server"]
        ]
        assert len(engines) == 1  # one replica for the whole burst
        wait_until(lambda: "echo ready after" in up.text(), 30, "the cold start reported")
        assert "│ echo  │ ready │ 1 " in _status(up, fleet_env)
        wait_until(lambda: "on demand: echo stopped" in up.text(), 60, "the idle model stopped")
        assert not _worker_processes(up.proc.pid)
        again = client.chat.completions.create(model="echo", messages=hi, max_tokens=4)
        assert again.choices[0].message.content
        assert up.text().count("on demand: starting echo") == 2
        wait_until(lambda: up.text().count("echo ready after") == 2, 30, "the second cold start")
    assert up.text().count("ready echo (fake)") == 2  # one worker each time


@pytest.mark.vllm
@pytest.mark.llamacpp
@pytest.mark.skipif(server_binary() is None, reason="needs llama-server (setup.sh --llamacpp)")
def test_up_starts_vllm_and_llama_server_on_demand_and_stops_them_when_idle(
    fleet_env: dict[str, str], tiny_model: Path, gguf_f32: Path, log_dir: Path
) -> None:
    """Two on-demand models on real engines: neither runs after start; the first request to
    each starts it (its cold start in `up`'s output) and is answered; after the idle timeout
    no engine is left."""
    cluster = log_dir / "cluster.yaml"
    cluster.write_text(
        "load: on_demand\n"
        "idle_timeout_s: 5\n"
        "models:\n"
        "  - {name: tiny-llama, engine: vllm}\n"
        f"  - {{name: tiny-gguf, engine: llama-server, source: {GGUF_NAME},"
        " engine_args: {threads: 1}}\n"
    )
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    on_demand = "every model is on demand"
    with running_up(["-f", str(cluster)], fleet_env, log_dir, 300, until=on_demand) as up:
        assert not _worker_processes(up.proc.pid)
        client = up.client().with_options(timeout=300)
        for model in ("tiny-llama", "tiny-gguf"):
            reply = client.chat.completions.create(model=model, messages=hi, max_tokens=4)
            assert reply.choices[0].message.content is not None
            assert up.text().count(f"on demand: starting {model}") == 1
        for model in ("tiny-llama", "tiny-gguf"):
            wait_until(lambda m=model: f"on demand: {m} stopped" in up.text(), 120, "idle stop")
        assert not _worker_processes(up.proc.pid)
    cold_starts = re.findall(r"on demand: (\S+) ready after ([\d.]+)s", up.text())
    assert {model for model, _ in cold_starts} == {"tiny-llama", "tiny-gguf"}
