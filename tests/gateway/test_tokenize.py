"""The gateway tokenizes as transformers does (what vLLM calls for chat templates).

vLLM itself is compared in tests/test_kv_routing_vllm.py (the engine's prompt_tokens and
its KV events); here transformers' ``apply_chat_template`` is the reference, for the demo
model's template and for a Llama-3-style one (special tokens as variables, loop controls,
``raise_exception``), on the same tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.tokenize import PromptTokenizer

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role') }}{% endif %}"
    "{% if loop.index0 == 0 and message['role'] != 'system' %}{% continue %}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hello there"}],
    [
        {"role": "system", "content": "You are terse.  "},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "More"}, {"type": "text", "text": "please"}],
        },
    ],
]


def _files(model_dir: Path, template: str | None = None) -> dict[str, str]:
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    files = {n: (model_dir / n).read_text() for n in names if (model_dir / n).is_file()}
    if template is not None:
        files.pop("chat_template.jinja", None)
        config = json.loads(files["tokenizer_config.json"])
        config["chat_template"] = template
        files["tokenizer_config.json"] = json.dumps(config)
    return files


def _flat(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Content parts joined as vLLM does for string-content templates."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        out.append({**message, "content": content})
    return out


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE], ids=["demo", "llama3-style"])
def test_chat_and_completions_tokenize_as_transformers_does(
    tiny_model: Path, template: str | None
) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(tiny_model)
    if template is not None:
        reference.chat_template = template
    ours = PromptTokenizer(_files(tiny_model, template))
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            text = reference.apply_chat_template(
                _flat(messages), tokenize=False, add_generation_prompt=generation_prompt
            )
            expected = reference.encode(text, add_special_tokens=False)
            payload = {"messages": messages, "add_generation_prompt": generation_prompt}
            assert ours.tokens(payload) == expected
    prompt = "Once upon a time, in a land far away"
    assert ours.tokens({"prompt": prompt}) == reference.encode(prompt)
    assert ours.tokens({"prompt": [prompt, "another"]}) == reference.encode(prompt)
    assert ours.tokens({"prompt": [5, 6, 7]}) == [5, 6, 7]


def test_what_cannot_be_rendered_gives_no_tokens(tiny_model: Path) -> None:
    ours = PromptTokenizer(_files(tiny_model, LLAMA3_STYLE))
    image = {"type": "image_url", "image_url": {"url": "data:..."}}
    assert ours.tokens({"messages": [{"role": "user", "content": [image]}]}) is None
    assert ours.tokens({"messages": [{"role": "robot", "content": "beep"}]}) is None  # raises
    assert ours.tokens({"prompt": {"not": "a prompt"}}) is None
    no_template = PromptTokenizer({"tokenizer.json": _files(tiny_model)["tokenizer.json"]})
    assert no_template.tokens({"messages": [{"role": "user", "content": "hi"}]}) is None


def test_cached_stretches_encode_as_the_whole_text_does(tiny_model: Path) -> None:
    """Long stretches between special tokens come from the cache: the ids must not change."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ours = PromptTokenizer(_files(tiny_model))
    assert ours._split is not None  # the demo tokenizer allows it
    pieces = st.sampled_from([*"ab cdé\n\t.,!0<|>/s", "<s>", "</s>", "<|user|>", " gamma"])
    long_text = st.lists(pieces, max_size=300).map("".join)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(long_text, min_size=1, max_size=4), st.randoms())
    def check(parts: list[str], rng: Any) -> None:
        text = "".join(parts)
        repeated = text + rng.choice(["", " tail", "<|user|>more"])
        for sample in (text, repeated, text):  # the second and third reuse cached stretches
            assert (
                ours.encode(sample, False)
                == ours.tokenizer.encode(sample, add_special_tokens=False).ids
            )

    check()
