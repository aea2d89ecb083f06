"""Reading an engine's load from its own metrics."""

from __future__ import annotations

from workers.load import parse_load

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 7.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1200.0
vllm:generation_tokens_total{engine="1",model_name="m"} 34.0
"""


def test_load_sums_engines_and_takes_the_fullest_kv_cache() -> None:
    load = parse_load(VLLM_METRICS)
    assert (load.running, load.waiting, load.kv_cache_usage) == (4, 2, 0.5)
    assert load.generated_tokens == 1234


def test_no_metrics_means_no_load() -> None:
    assert parse_load("") == parse_load("# nothing here\n")


LLAMA_SERVER_METRICS = """\
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 4000
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 3
"""


def test_llama_servers_own_names_are_read_too() -> None:
    load = parse_load(LLAMA_SERVER_METRICS)
    assert (load.running, load.waiting, load.generated_tokens) == (2, 3, 4000)


SGLANG_METRICS = """\
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 5.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 1.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.4
# TYPE sglang:generation_tokens counter
sglang:generation_tokens_total{model_name="m"} 321.0
"""

TGI_METRICS = """\
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 6
# TYPE tgi_queue_size gauge
tgi_queue_size 2
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_bucket{le="+Inf"} 3
tgi_request_generated_tokens_sum 77
tgi_request_generated_tokens_count 3
"""


def test_attached_servers_names_are_read_too() -> None:
    """SGLang and TGI, which an attached worker (engine openai) may watch."""
    sglang = parse_load(SGLANG_METRICS)
    assert (sglang.running, sglang.waiting, sglang.kv_cache_usage) == (5, 1, 0.4)
    assert sglang.generated_tokens == 321
    tgi = parse_load(TGI_METRICS)
    assert (tgi.running, tgi.waiting, tgi.generated_tokens) == (6, 2, 77)
