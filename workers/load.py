"""Read an engine's load from its own Prometheus metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fleetserve.protocol import WorkerLoad

# vLLM's names, which the fake engine and the llamacpp launcher speak too, and llama-server's.
_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_GENERATED = ("vllm:generation_tokens_total", "llamacpp:tokens_predicted_total")


def parse_load(metrics_text: str) -> WorkerLoad:
    running = waiting = generated = 0.0
    kv_cache = 0.0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in _RUNNING:
                running += sample.value
            elif sample.name in _WAITING:
                waiting += sample.value
            elif sample.name in _KV_CACHE:
                kv_cache = max(kv_cache, sample.value)
            elif sample.name in _GENERATED:
                generated += sample.value
    return WorkerLoad(
        running=int(running),
        waiting=int(waiting),
        kv_cache_usage=min(kv_cache, 1.0),
        generated_tokens=int(generated),
    )
