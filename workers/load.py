"""Read an engine's load from its own Prometheus metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fleetserve.protocol import WorkerLoad

# vLLM's names; the fake engine and other engines speak the same.
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_GENERATED = "vllm:generation_tokens_total"


def parse_load(metrics_text: str) -> WorkerLoad:
    running = waiting = generated = 0.0
    kv_cache = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == _RUNNING:
                running += sample.value
            elif sample.name == _WAITING:
                waiting += sample.value
            elif sample.name in _KV_CACHE:
                kv_cache = max(kv_cache, sample.value)
            elif sample.name == _GENERATED:
                generated += sample.value
    return WorkerLoad(
        running=int(running),
        waiting=int(waiting),
        kv_cache_usage=min(kv_cache, 1.0),
        generated_tokens=int(generated),
    )
