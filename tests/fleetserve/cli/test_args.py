"""Settings -> command line -> settings gives the same settings back, for every process."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from controller.settings import ControllerSettings
from fleetserve.cli import build_parser
from fleetserve.cli.args import settings_argv, settings_from
from gateway.settings import ApiKey, GatewaySettings
from workers.settings import Device, WorkerSettings

# A value other than the default for every field (a new field must be added here).
EXAMPLES: dict[type[BaseModel], dict[str, Any]] = {
    ControllerSettings: {
        "host": "0.0.0.0",
        "port": 9001,
        "heartbeat_interval_s": 0.5,
        "expiry_after_s": 2.5,
        "cluster_token_file": "/etc/fleetserve/cluster-token",
        "insecure": True,
        "tls_cert_file": "/etc/fleetserve/tls.crt",
        "tls_key_file": "/etc/fleetserve/tls.key",
        "header_timeout_s": 5.0,
        "max_header_bytes": 16384,
        "max_connections": 100,
        "models_file": "/etc/fleetserve/cluster.yaml",
    },
    GatewaySettings: {
        "host": "0.0.0.0",
        "port": 9000,
        "controller_url": "http://10.0.0.5:8001",
        "max_body_bytes": 1024,
        "processes": 2,
        "access_log": True,
        "max_tokens_limit": 64,
        "request_timeout_s": 30.0,
        "drain_timeout_s": 600.0,
        "keys_file": "/etc/fleetserve/keys.yaml",
        "keys": [ApiKey(name="k", key_sha256="0" * 64)],  # not a flag: `up` writes a keys file
        "cluster_token_file": "/etc/fleetserve/cluster-token",
        "ca_file": "/etc/fleetserve/ca.crt",
        "tls_cert_file": "/etc/fleetserve/tls.crt",
        "tls_key_file": "/etc/fleetserve/tls.key",
        "header_timeout_s": 5.0,
        "max_header_bytes": 16384,
        "max_connections": 100,
        "max_audio_body_bytes": 2048,
        "secrets_dir": "/etc/fleetserve/secrets",
        "routing_policy": "prefix_tree",
        "stream_idle_timeout_s": 12.5,
        "max_resumes": 3,
        "retry_budget_ratio": 0.5,
        "retry_budget_min_per_s": 2.0,
        "circuit_failures": 7,
        "circuit_open_s": 4.0,
        "hold_timeout_s": 30.0,
    },
    WorkerSettings: {
        "engine": "openai",
        "source": "/models/m",
        "served_name": "m",
        "aliases": ["a", "b"],
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 2,
        "device": Device.CPU,
        "nodes": ["10.0.0.1", "10.0.0.2"],
        "node_rank": 1,
        "ray_port": 7000,
        "start_timeout_s": 7200.0,
        "sleep_after_s": 60.0,
        "controller_url": "http://c:8001",
        "host": "0.0.0.0",
        "port": 8100,
        "advertise_host": "10.0.0.1",
        "engine_args": ["--max-num-seqs", "8"],  # after `--`
        "routing_policy": "session",
        "ray_address": "10.0.0.1:6379",
        "exit_when_engine_dies": True,
        "status_port": 8081,
        "cluster_token_file": "/etc/fleetserve/cluster-token",
        "ca_file": "/etc/fleetserve/ca.crt",
        "header_timeout_s": 5.0,
        "max_header_bytes": 16384,
        "max_connections": 100,
        "fallbacks": ["m2", "m3"],
        "url": "https://api.example.com/v1",
        "upstream_model": "their/name:7b",
        "upstream_key": "EXAMPLE_KEY",
        "secrets_dir": "/etc/fleetserve/secrets",
        "endpoints": ["/v1/chat/completions", "/v1/embeddings"],
        "capacity": 12,
        "kv_events_port": 8082,
        "max_adapters": 4,
        "max_lora_rank": 32,
    },
}
COMMANDS = {ControllerSettings: "controller", GatewaySettings: "gateway", WorkerSettings: "worker"}
NOT_FLAGS = {"keys", "engine_args"}


@pytest.mark.parametrize("model", list(EXAMPLES), ids=lambda model: model.__name__)
def test_every_setting_survives_the_command_line(model: type[BaseModel]) -> None:
    assert set(EXAMPLES[model]) == set(model.model_fields), "give every field an example"
    values = {k: v for k, v in EXAMPLES[model].items() if k not in NOT_FLAGS}
    settings = model.model_validate(values)
    argv = [COMMANDS[model], *settings_argv(settings, skip=tuple(NOT_FLAGS))]
    parsed = settings_from(model, build_parser().parse_args(argv))
    assert parsed == settings


def test_defaults_and_skipped_fields_are_left_out() -> None:
    settings = WorkerSettings(served_name="m", engine_args=["--x", "1"])
    assert settings_argv(settings, skip=("engine_args",)) == ["--served-name", "m"]
