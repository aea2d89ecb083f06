"""The cluster file: what is accepted, and the messages for what is not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetserve.cli.args import validation_context
from fleetserve.cli.cluster import load_cluster_file, parse_cluster
from fleetserve.errors import ConfigError
from tests.helpers import up_refuses

GOOD = """
controller: {port: 9001, heartbeat_interval_s: 1, expiry_after_s: 4}
gateway: {port: 9000}
models:
  - name: llama-70b
    aliases: [llama]
    engine: vllm
    source: meta-llama/Llama-3.1-70B-Instruct
    tensor_parallel_size: 4
    replicas: 2
    engine_args: {max_num_seqs: 64, enforce_eager: true, enable_prefix_caching: false}
  - name: echo
    engine: fake
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_a_full_cluster_file_loads(tmp_path: Path) -> None:
    cluster = load_cluster_file(_write(tmp_path, GOOD))
    llama = cluster.models[0]
    assert (llama.tensor_parallel_size, llama.replicas, llama.aliases) == (4, 2, ["llama"])
    assert llama.engine_flags() == ["--max-num-seqs", "64", "--enforce-eager"]
    assert cluster.controller.port == 9001 and cluster.gateway.port == 9000
    assert cluster.models[1].replicas == 1


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ("[{name: a, engine: fake, replica: 2}]", "models[0].replica: unknown key"),
        (
            "[{name: a, engine: fake, replicas: two}]",
            "models[0].replicas: Input should be a valid integer",
        ),
        (
            "[{name: a, engine: fake, replicas: 0}]",
            "models[0].replicas: Input should be greater than or equal to 1",
        ),
        (
            "[{name: a, engine: nope}]",
            "models[0].engine: unknown engine 'nope'; choose one of "
            "['fake', 'llama-server', 'llamacpp', 'openai', 'vllm']",
        ),
        (
            "[{name: a, engine: fake}, {name: b, engine: fake, aliases: [a]}]",
            "alias 'a' of model 'b' is already used by model 'a'",
        ),
        (
            "[{name: a, engine: fake}, {name: a, engine: fake}]",
            "model name 'a' of model 'a' is already used",
        ),
        ("[]", "models: List should have at least 1 item"),
        (
            "[{name: a, engine: openai}]",
            "url goes with engine 'openai', and that engine needs a url",
        ),
        ("[{name: a, engine: fake, url: 'http://x/v1'}]", "url goes with engine 'openai'"),
        (
            "[{name: a, engine: openai, url: [http://x/v1, http://y/v1], replicas: 3}]",
            "replicas is 3 but 2 url(s) are given",
        ),
        (
            "[{name: a, engine: openai, url: http://x/v1, endpoints: [/v1/chat]}]",
            "endpoint '/v1/chat' is not one the gateway routes",
        ),
        (
            "[{name: a, engine: openai, url: http://x/v1, upstream_key: 'my key'}]",
            "models[0].upstream_key: String should match pattern",
        ),
        ("[{name: a, engine: fake, fallbacks: [b]}]", "fallback 'b' of model 'a' is not another"),
        ("[{name: a, engine: fake, fallbacks: [a]}]", "fallback 'a' of model 'a' is not another"),
        ("[{name: 'bad name', engine: fake}]", "models[0].name: String should match pattern"),
    ],
)
def test_invalid_files_say_what_is_wrong(tmp_path: Path, models: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_cluster_file(_write(tmp_path, f"models: {models}\n"), context=validation_context())
    assert message in str(error.value)


def test_attached_servers_and_fallbacks_in_a_cluster_file(tmp_path: Path) -> None:
    cluster = load_cluster_file(
        _write(
            tmp_path,
            """
models:
  - name: big
    engine: fake
    fallbacks: [small, small-alias]
  - name: small
    aliases: [small-alias]
    engine: openai
    url: [http://10.0.0.7:11434/v1, http://10.0.0.8:11434/v1]
    upstream_model: qwen2.5:0.5b
    upstream_key: OLLAMA_KEY
    capacity: 4
    endpoints: [/v1/chat/completions, /v1/embeddings]
""",
        ),
        context=validation_context(),
    )
    big, small = cluster.models
    assert big.fallbacks == ["small", "small-alias"]
    assert small.replicas == 2  # one per url
    from fleetserve.cli.up import worker_settings

    second = worker_settings(small, "127.0.0.1", None, replica=1)
    assert (second.url, second.upstream_model, second.upstream_key, second.capacity) == (
        "http://10.0.0.8:11434/v1",
        "qwen2.5:0.5b",
        "OLLAMA_KEY",
        4,
    )
    assert worker_settings(big, "127.0.0.1", None).fallbacks == ["small", "small-alias"]


def test_unknown_top_level_key_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gatway: unknown key"):
        parse_cluster({"models": [{"name": "a", "engine": "fake"}], "gatway": {}})
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_cluster_file(_write(tmp_path, "models: [\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster_file(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"expiry_after_s .* must be longer"):
        parse_cluster(
            {
                "models": [{"name": "a"}],
                "controller": {"expiry_after_s": 1, "heartbeat_interval_s": 2},
            }
        )


def test_up_refuses_an_invalid_file_before_starting_anything(tmp_path: Path) -> None:
    path = _write(tmp_path, "models: [{name: a, engine: fake, replicas: 0}]\n")
    assert "models[0].replicas" in up_refuses(path).stderr


def test_worker_flags_come_from_the_settings_model() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for flag in (
        "--served-name",
        "--alias",
        "--tensor-parallel-size",
        "--controller-url",
        "--engine",
    ):
        assert flag in result.stdout
    assert "The model name clients ask for." in result.stdout


def test_engine_flags_from_the_command_line_become_engine_args() -> None:
    from fleetserve.cli.cluster import ModelSpec
    from workers.settings import engine_args_from_flags

    flags = ["--max-model-len", "2048", "--enforce-eager", "--dtype=half"]
    args = engine_args_from_flags(flags)
    assert args == {"max_model_len": "2048", "enforce_eager": True, "dtype": "half"}
    assert ModelSpec(name="m", engine_args=args).engine_flags() == [
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "half",
    ]
    with pytest.raises(ConfigError, match="engine flag expected, got 'oops'"):
        engine_args_from_flags(["oops"])
