"""Adapters in the cluster file and on disk, checked before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleetserve.cli.cluster import parse_cluster
from fleetserve.errors import ConfigError
from tests.helpers import up_refuses
from workers.adapters import inspect_adapter


def _adapter(path: Path, **config: Any) -> Path:
    path.mkdir(parents=True)
    fields = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(fields))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def _cluster(*models: dict[str, Any]) -> None:
    parse_cluster({"models": list(models)})


def test_an_adapters_files_are_read_and_checked(tmp_path: Path) -> None:
    facts = inspect_adapter(str(_adapter(tmp_path / "ok")), max_lora_rank=16)
    assert facts.rank == 8 and facts.target_modules == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match="rank 32 is over the model's max_lora_rank 16"):
        inspect_adapter(str(_adapter(tmp_path / "big", r=32)), 16)
    with pytest.raises(ConfigError, match="no such directory"):
        inspect_adapter(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no target_modules"):
        inspect_adapter(str(_adapter(tmp_path / "t", target_modules=[])))
    with pytest.raises(ConfigError, match="not a LoRA"):
        inspect_adapter(str(_adapter(tmp_path / "ia3", peft_type="IA3")))
    (tmp_path / "ok" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights"):
        inspect_adapter(str(tmp_path / "ok"))


def test_adapter_names_collide_with_no_model_or_alias_and_need_vllm() -> None:
    adapter = {"name": "a", "source": "/x"}
    with pytest.raises(ConfigError, match="the name 'm2' is already used by 'm2'"):
        _cluster(
            {"name": "m", "adapters": [{"name": "m2", "source": "/x"}]},
            {"name": "m2", "engine": "fake"},
        )
    with pytest.raises(ConfigError, match="the name 'a' is already used by 'a'"):
        _cluster({"name": "m", "adapters": [adapter, {**adapter, "aliases": []}]})
    with pytest.raises(ConfigError, match=r"llama\.cpp's and other engines' adapters are not"):
        _cluster({"name": "m", "engine": "llamacpp", "source": "/m.gguf", "adapters": [adapter]})
    cluster = parse_cluster({"models": [{"name": "m", "adapters": [adapter]}]})
    (spec,) = cluster.models
    assert spec.adapter_slots == 8
    (declared,) = spec.adapter_declarations()
    assert declared.base == "m" and declared.source == "/x" and declared.replicas == 0


def test_up_refuses_a_bad_adapter_before_starting_anything(tmp_path: Path) -> None:
    big = _adapter(tmp_path / "big", r=64)
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"models: [{{name: m, source: /nowhere, adapters: [{{name: a, source: {big}}}]}}]\n"
    )
    result = up_refuses(path)
    assert "rank 64 is over the model's max_lora_rank 16" in result.stderr
