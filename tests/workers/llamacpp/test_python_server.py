"""The llamacpp engine's pieces that need no model: flags, load gauges, pre-tokenizer choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetserve.cli.cluster import ModelSpec
from fleetserve.errors import ConfigError
from workers.llamacpp.python_server import InFlightCount, parse_engine_args, tokens_in_answer
from workers.llamacpp.shim import byte_level_pre_tokenizer
from workers.load import parse_load

KNOWN = {"n_ctx", "n_threads", "n_gpu_layers", "flash_attn"}


def test_cluster_file_engine_args_become_llama_cpp_settings() -> None:
    spec = ModelSpec(
        name="m",
        engine="llamacpp",
        engine_args={"n_ctx": 2048, "n_threads": 2, "n_gpu_layers": 0, "flash_attn": True},
    )
    assert parse_engine_args(spec.engine_flags(), KNOWN) == {
        "n_ctx": "2048",
        "n_threads": "2",
        "n_gpu_layers": "0",
        "flash_attn": "true",
    }
    assert parse_engine_args(["--n_ctx=512"], KNOWN) == {"n_ctx": "512"}


def test_an_unknown_setting_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'n_parallel'.*n_ctx"):
        parse_engine_args(["--n-parallel", "4"], KNOWN)


def test_in_flight_requests_read_as_one_running_and_the_rest_waiting() -> None:
    count = InFlightCount()
    count.count = 3
    load = parse_load(count.metrics())
    assert (load.running, load.waiting) == (1, 2)
    count.count = 0
    assert (parse_load(count.metrics()).running, parse_load(count.metrics()).waiting) == (0, 0)


def _tokenizer_dir(tmp_path: Path, pre_tokenizer: dict[str, object]) -> Path:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"pre_tokenizer": pre_tokenizer}))
    return tmp_path


def test_gpt2_style_byte_level_tokenizers_get_the_gpt2_pre_tokenizer(tmp_path: Path) -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert byte_level_pre_tokenizer(_tokenizer_dir(tmp_path, byte_level)) == "gpt-2"


def test_other_pre_tokenizers_are_not_guessed(tmp_path: Path) -> None:
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}
    assert byte_level_pre_tokenizer(_tokenizer_dir(tmp_path, split)) is None
    no_regex = {"type": "ByteLevel", "use_regex": False}
    assert byte_level_pre_tokenizer(_tokenizer_dir(tmp_path, no_regex)) is None


def test_tokens_of_an_answer_come_from_its_usage_or_its_stream_chunks() -> None:
    assert tokens_in_answer(b'{"usage": {"completion_tokens": 7}}', streamed=False) == 7
    role = b'data: {"choices": [{"delta": {"role": "assistant"}, "finish_reason": null}]}'
    token = b'data: {"choices": [{"delta": {"content": "x"}, "finish_reason": null}]}'
    last = b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}'
    stream = b"\n\n".join([role, token, token, token, last, b"data: [DONE]"])
    assert tokens_in_answer(stream, streamed=True) == 3
