"""The pure parts of resume (gateway/resume.py): which requests resume, what the client has,
where to continue from, and how the rest is written for the client. No network."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from fleetserve import constants
from gateway.resume import (
    Continuation,
    EngineFailed,
    ResumePlan,
    StreamLog,
    clean_prefix,
    resume_body,
    strip_prompt_ids,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({}, None),
        ({"temperature": 0.7, "seed": 3, "stop": ["\n"], "frequency_penalty": 0.5}, None),
        ({"n": 2}, "n > 1 or best_of"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "text"}}, None),
        ({"structured_outputs": {"regex": "a+"}}, "guided decoding"),
        ({"stream_options": {"continuous_usage_stats": True}}, "continuous usage stats"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "a multimodal prompt",
        ),
    ],
)
def test_what_resumes_exactly(extra: dict[str, Any], reason: str | None) -> None:
    assert ResumePlan({**CHAT, **extra}, chat=True).unsupported == reason


def test_completions_resume_one_prompt_only() -> None:
    def plan(prompt: Any, **extra: Any) -> str | None:
        return ResumePlan({"model": "m", "prompt": prompt, **extra}, chat=False).unsupported

    assert plan("a") is None and plan(["a"]) is None and plan([1, 2, 3]) is None
    assert plan(["a", "b"]) == "several prompts"
    assert plan("a", echo=True) == "echo"
    assert plan("a", suffix="z") == "suffix"


def test_the_engine_is_asked_for_token_ids_and_the_client_sees_the_prompts_only_if_asked() -> None:
    plan = ResumePlan(CHAT, chat=True)
    body = orjson.dumps(CHAT)
    asked = plan.ask_token_ids(body)
    assert orjson.loads(asked) == {**CHAT, "return_token_ids": True}
    assert asked.endswith(body[1:])  # the client's bytes, a field in front
    refused = {**CHAT, "return_token_ids": False}  # a later key would win: encoded again
    asked_again = ResumePlan(refused, chat=True).ask_token_ids(orjson.dumps(refused))
    assert orjson.loads(asked_again)["return_token_ids"] is True
    first = (
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":""}}],'
        b'"prompt_token_ids":[1,2,3]}\n\ndata: {"choices":[{"text":"]","token_ids":[7]}]}\n\n'
    )
    assert strip_prompt_ids(first) == (  # the prompt's ids (long) go; a chunk's own stay
        b'data: {"id":"c","choices":[{"index":0,"delta":{"content":""}}],'
        b'"prompt_token_ids":null}\n\ndata: {"choices":[{"text":"]","token_ids":[7]}]}\n\n'
    )
    client_asked = ResumePlan({**CHAT, "return_token_ids": True}, chat=True)
    assert client_asked.ask_token_ids(body) is body and client_asked.client_token_ids


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _chat_log(deltas: list[tuple[str, list[int]]]) -> StreamLog:
    log = StreamLog()
    head = {"id": "chatcmpl-1", "created": 7, "model": "m"}
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
    log.add(_event({**head, "choices": [role], "prompt_token_ids": [1, 2]}))
    for text, ids in deltas:
        log.add(
            _event(
                {**head, "choices": [{"index": 0, "delta": {"content": text}, "token_ids": ids}]}
            )
        )
    log.parse()
    return log


def test_the_log_reads_what_the_client_got_and_stays_small() -> None:
    log = _chat_log([("a", [10]), ("", [11]), ("é b", [12, 13])])
    assert (log.prompt, log.ids, "".join(log.text)) == ([1, 2], [10, 11, 12, 13], "aé b")
    assert log.meta == {"id": "chatcmpl-1", "created": 7, "model": "m"}
    assert log.unsupported is None and log.finish_reason is None
    long = StreamLog()
    event = _event({"choices": [{"index": 0, "text": "x" * 100, "token_ids": [1]}]})
    for _ in range(2 * constants.STREAM_LOG_COMPACT_BYTES // len(event)):
        long.add(event)
    assert long._size <= constants.STREAM_LOG_COMPACT_BYTES  # parsed as it went
    reasoning = StreamLog()
    reasoning.add(_event({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]}))
    reasoning.parse()
    assert reasoning.unsupported == "reasoning or tool calls in the answer"


#: A byte-level vocabulary: token 1 is " \xe6" (a space and 日's first byte), 2 and 3 the rest.
_PIECES = {0: b"ab", 1: b" \xe6", 2: b"\x97", 3: b"\xa5", 4: b" c"}


def _detokenize(ids: list[int]) -> str:
    return b"".join(_PIECES[i] for i in ids).decode("utf-8", "replace")


def _clean(
    ids: list[int], text: str, decode: Any = _detokenize
) -> tuple[tuple[int, int], list[int]]:
    calls: list[int] = []

    async def detokenize(prefix: list[int]) -> str:
        calls.append(len(prefix))
        return str(decode(prefix))

    return asyncio.run(clean_prefix(ids, text, detokenize)), calls


def test_continue_from_the_longest_prefix_the_client_has() -> None:
    # nothing held back: every token, one call
    assert _clean([0, 1, 2, 3, 4], "ab 日 c") == ((5, 6), [5])
    # the client got "ab " of token 1 (" " + an unfinished 日): continue after token 0, and
    # skip the space the client already has
    assert _clean([0, 1, 2], "ab ")[0] == (1, 2)
    # a stop string's start held back ("ab 日" not streamed yet): further back
    assert _clean([0, 1, 2, 3, 4], "ab")[0] == (1, 2)
    assert _clean([0], "")[0] == (0, 0)
    # SentencePiece: decoding drops the first token's leading space, the stream had it
    assert _clean([4, 0], " cab", lambda ids: _detokenize(ids).lstrip())[0] == (2, 4)


def test_the_rest_is_written_as_the_clients_stream_once() -> None:
    log = _chat_log([("ab", [0]), (" ", [1])])  # 日 unfinished when the stream broke
    plan = ResumePlan({**CHAT, "max_tokens": 5}, chat=True)
    (k, chars), _ = _clean(log.ids, "".join(log.text))
    assert (k, chars) == (1, 2)
    body = orjson.loads(resume_body(plan, log, k, max_model_len=None))
    assert body["prompt"] == [1, 2, 0] and body["max_tokens"] == 4 and body["return_token_ids"]
    rest = Continuation(plan, log, k, chars)
    head = {"id": "cmpl-9", "object": "text_completion", "created": 99, "model": "m"}
    out = rest.feed(
        _event({**head, "choices": [{"index": 0, "text": " 日", "token_ids": [1, 2, 3]}]})
    )
    out += rest.feed(
        _event(
            {
                **head,
                "choices": [
                    {"index": 0, "text": " c", "token_ids": [4], "finish_reason": "length"}
                ],
            }
        )
    )
    out += rest.feed(
        _event({**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    )
    out += rest.feed(b"data: [DONE]\n\n")
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events if e["choices"]) == "日 c"
    assert {(e["id"], e["created"], e["object"]) for e in events} == {
        ("chatcmpl-1", 7, "chat.completion.chunk")
    }
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]] == [None, "length"]
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert rest.done and out.endswith(b"data: [DONE]\n\n")
    assert (log.ids, "".join(log.text)) == ([0, 1, 2, 3, 4], "ab 日 c")
    failing = Continuation(plan, _chat_log([("ab", [0])]), 1, 2)
    with pytest.raises(EngineFailed):
        failing.feed(b'data: {"error": {"message": "EngineCore died", "code": 500}}\n\n')
