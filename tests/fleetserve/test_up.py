"""`fleetserve up`: the one command that runs a whole cluster on this machine."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from fleetserve import procs
from gateway.auth import hash_key
from tests.helpers import alive, descendants, free_port, wait_until


def _up(args: list[str], env: dict[str, str], out: Path) -> subprocess.Popen[bytes]:
    with out.open("wb") as sink:
        return procs.spawn(
            [sys.executable, "-m", "fleetserve.cli", "up", *args],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _run_until_ready_then_interrupt(
    args: list[str],
    env: dict[str, str],
    log_dir: Path,
    model: str,
    timeout_s: float,
    api_key: str = "x",
) -> str:
    port = free_port()
    out = log_dir / "up.out"
    up = _up(
        [
            *args,
            "--port",
            str(port),
            "--controller-port",
            str(free_port()),
            "--log-dir",
            str(log_dir),
        ],
        env,
        out,
    )
    try:
        wait_until(
            lambda: "all workers ready" in out.read_text() or up.poll() is not None,
            timeout_s,
            "all workers ready",
        )
        assert up.poll() is None, out.read_text()
        tree = descendants(up.pid)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0
        )
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        if api_key != "x":  # the cluster file's keys are in force
            wrong = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
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
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(120) == 0
        assert not [pid for pid in tree if alive(pid)], "processes outlived `fleetserve up`"
    finally:
        procs.stop(up, 5)
    text = out.read_text()
    assert f"http://127.0.0.1:{port}/v1" in text and "stopped" in text
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
    text = _run_until_ready_then_interrupt([], fleet_env, log_dir, "tiny-llama", 300)
    assert "ready tiny-llama (vllm)" in text
