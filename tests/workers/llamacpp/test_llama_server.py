"""The `llama-server` engine: llama.cpp's own C++ server, with parallel slots, serving the
tiny model's GGUF file behind the gateway. scripts/setup.sh --llamacpp builds the server
from llama-cpp-python's sources; nothing here is mocked.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import GGUF_NAME, module_log_dir
from tests.helpers import (
    LocalCluster,
    assert_engine_refuses_everyone_but_gateways,
    drain_under_load,
    engine_pid,
    hf_greedy,
    wait_until,
)
from workers.llamacpp.source import server_binary

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        server_binary() is None, reason="needs llama-server: scripts/setup.sh --llamacpp builds it"
    ),
]

NAME = "tiny-slots"
SLOTS = 2


@pytest.fixture(scope="module")
def cluster(fleet_env: dict[str, str], gguf_f32: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(module_log_dir("test_llama_server"), fleet_env)
    flags = ("--parallel", str(SLOTS), "--threads", "1")
    local.add_worker(NAME, "llama-server", "--source", GGUF_NAME, engine_args=flags)
    try:
        local.wait_workers(NAME, 1)
        yield local
    finally:
        local.close()


def _engine_metric(cluster: LocalCluster, name: str) -> float:
    (worker,) = cluster.table().workers
    with cluster.engine(worker.worker_id) as engine:
        text = engine.get("/metrics").text
    (line,) = [x for x in text.splitlines() if x.startswith(name + " ")]
    return float(line.split()[1])


def test_the_engine_refuses_every_route_around_the_gateway(cluster: LocalCluster) -> None:
    """The red team's check (tests/test_security.py) on llama-server, on a Unix socket."""
    (worker_id,) = cluster.worker_ids(NAME)
    assert_engine_refuses_everyone_but_gateways(cluster, worker_id)


def test_greedy_answers_are_the_hf_models_streaming_and_not(
    cluster: LocalCluster, tiny_model: Path
) -> None:
    client = cluster.client()
    prompt = "The logging module"
    expected = hf_greedy(tiny_model, prompt, 24)
    kwargs = {"model": NAME, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    text = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    with client.completions.with_streaming_response.create(**kwargs, stream=True) as response:  # type: ignore[call-overload]
        assert response.headers["x-fleetserve-worker"]
        streamed = "".join(c.choices[0].text for c in response.parse() if c.choices)
    print(f"transformers: {expected!r}\nllama-server: {text!r}")
    assert expected.strip()
    # (where the random model's byte tokens cut a UTF-8 character, transformers shows U+FFFD)
    assert text.replace("\ufffd", "") == expected.replace("\ufffd", "")
    # A character cut by the answer's end: llama-server's stream holds its bytes back for good.
    assert streamed in (text, text.rstrip("\ufffd"))
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content is not None


def test_slots_generate_side_by_side_and_the_controller_knows_them(
    cluster: LocalCluster,
) -> None:
    (worker,) = cluster.table().workers
    assert worker.capacity == SLOTS  # registered from --parallel: the gateway balances on it
    client = cluster.client(timeout=120)

    def long_answer(i: int) -> int:
        answer = client.completions.create(
            model=NAME,
            prompt=f"story {i}",
            max_tokens=1000,
            extra_body={"ignore_eos": True},  # llama-server's sampling option, as vLLM's
        )
        assert answer.usage is not None
        return answer.usage.completion_tokens

    # Four requests at once for two slots: two decode together, two wait their turn.
    before = _engine_metric(cluster, "llamacpp:tokens_predicted_total")
    with ThreadPoolExecutor(4) as pool:
        produced = list(pool.map(long_answer, range(4)))
    assert produced == [1000] * 4
    # llama.cpp's own figure: more than one slot busy per decode call on average.
    assert _engine_metric(cluster, "llamacpp:n_busy_slots_per_decode") > 1
    # The engine's token counter reaches the controller (`fleetserve status`'s tok/s).
    wait_until(
        lambda: cluster.table().workers[0].load.generated_tokens - before >= 4000,
        30,
        "the generated tokens to reach the controller",
    )


def test_a_prompt_longer_than_a_slot_gets_the_engines_error_in_openai_form(
    cluster: LocalCluster,
) -> None:
    # The model's 8192 positions are shared by the two slots: 4096 each.
    with pytest.raises(openai.BadRequestError) as error:
        cluster.client().completions.create(model=NAME, prompt="hello " * 6000, max_tokens=4)
    assert error.value.status_code == 400
    assert "context" in str(error.value.message)


def test_a_killed_server_is_restarted_and_serves_again(cluster: LocalCluster) -> None:
    worker = next(c for c in cluster.components if c.name == f"worker-{NAME}-0")
    first = engine_pid(worker)
    assert first is not None and Path(f"/proc/{first}/exe").resolve().name == "llama-server"
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not cluster.worker_ids(NAME), 15, "the dead server's worker to leave")
    cluster.wait_workers(NAME, 1)
    assert engine_pid(worker) not in (None, first)
    answer = cluster.client().completions.create(model=NAME, prompt="again", max_tokens=4)
    assert answer.choices[0].text


def test_sigterm_drains_the_worker_with_zero_failed_requests(cluster: LocalCluster) -> None:
    # In-flight requests finish; later ones get a clean 503 (no other worker of the name).
    assert drain_under_load(cluster, NAME).failed_mid_stream == []
