"""Child process of `fleetserve model convert`: llama.cpp's converter or quantizer.

``python -m workers.llamacpp.shim convert SRC [--pre-tokenizer NAME] CONVERTER_ARGS...``
runs ``SRC/convert_hf_to_gguf.py`` (llama.cpp's converter, from the
llama-cpp-python sources) with one change made at run time, not in its files:

llama.cpp picks a BPE tokenizer's pre-tokenizer (the regex splitting text
before merges) by hashing the tokens of a test string and looking the hash up
in a table of known hub models. A tokenizer trained locally, such as the demo
model's, is in no table, and the converter stops ("BPE pre-tokenizer was not
recognized"). When that happens and ``tokenizer.json`` says the pre-tokenizer
is ``ByteLevel`` with its default regex, which is GPT-2's, the name written is
``gpt-2``: llama.cpp's GPT-2 pre-tokenizer splits with the same regex.
``--pre-tokenizer NAME`` forces a name for any other tokenizer.

``python -m workers.llamacpp.shim quantize IN OUT TYPE`` runs llama.cpp's
quantizer (``llama_model_quantize`` through llama-cpp-python's bindings).
Both run apart from the CLI so that a crash in native code is reported, not fatal.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("fleetserve.gguf")


def byte_level_pre_tokenizer(model_dir: Path) -> str | None:
    """``gpt-2`` when the model's tokenizer pre-tokenizes like GPT-2; None when unsure."""
    try:
        data = json.loads((model_dir / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return None
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _patch_pre_tokenizer(forced: str | None) -> None:
    from conversion.base import TextModel  # the converter's package, on sys.path by now

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        if forced:
            return forced
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            name = byte_level_pre_tokenizer(Path(self.dir_model))
            if name is None:
                raise
            logger.warning("pre-tokenizer not in llama.cpp's table; ByteLevel: using %r", name)
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def convert(argv: list[str]) -> int:
    source, rest = Path(argv[0]), argv[1:]
    forced = None
    if rest[:1] == ["--pre-tokenizer"]:
        forced, rest = rest[1], rest[2:]
    sys.path.insert(0, str(source))
    _patch_pre_tokenizer(forced)
    script = source / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def quantize(source: str, target: str, type_name: str) -> int:
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}", None)
    if ftype is None:
        print(f"llama.cpp has no quantization type {type_name!r}", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    code = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    return int(code)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    if argv[:1] == ["convert"]:
        return convert(argv[1:])
    if argv[:1] == ["quantize"] and len(argv) == 4:
        return quantize(*argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
