"""The gateway's metrics as Prometheus reads them, from records made by hand."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fleetserve import constants
from gateway.metrics import GatewayMetrics, RequestRecord
from gateway.usage import UsageMeter


def _samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _stream(started: float, answered: float, engine_s: float, completion: int) -> RequestRecord:
    meter = UsageMeter(None)
    meter.read_body(
        b'{"usage": {"prompt_tokens": 7, "completion_tokens": %d, "total_tokens": %d}}'
        % (completion, completion + 7)
    )
    return RequestRecord(
        started,
        started,
        model="m",
        key="team",
        stream=True,
        upstream_s=engine_s,
        answered=answered,
        status=200,
        meter=meter,
    )


def test_histograms_are_cumulative_and_split_gateway_from_engine_time() -> None:
    metrics = GatewayMetrics()
    # 10 s stream: first chunk after 0.3 s of which the engine took 0.299 s; 11 tokens
    metrics.record(_stream(100.0, 100.3, 0.299, 11), ended=110.3)
    metrics.record(_stream(200.0, 200.04, 0.0385, 1), ended=200.06)
    metrics.record(RequestRecord(300.0, 300.0, model="unknown", status=404), ended=300.001)
    s = _samples(metrics)
    ttft = "fleetserve_gateway_time_to_first_token_seconds"
    assert s[(f"{ttft}_count", frozenset({("model", "m")}))] == 2
    assert s[(f"{ttft}_bucket", frozenset({("model", "m"), ("le", "0.05")}))] == 1
    assert s[(f"{ttft}_bucket", frozenset({("model", "m"), ("le", "0.35")}))] == 2
    assert s[(f"{ttft}_bucket", frozenset({("model", "m"), ("le", "+Inf")}))] == 2
    added = "fleetserve_gateway_added_seconds"
    assert abs(s[(f"{added}_sum", frozenset({("model", "m")}))] - 0.0025) < 1e-9
    # time per output token: 10 s over the 10 tokens after the first; one token: none
    tpot = "fleetserve_gateway_time_per_output_token_seconds"
    assert s[(f"{tpot}_count", frozenset({("model", "m")}))] == 1
    assert abs(s[(f"{tpot}_sum", frozenset({("model", "m")}))] - 1.0) < 1e-9
    tokens = frozenset({("model", "m"), ("key", "team")})
    assert s[("fleetserve_gateway_completion_tokens_total", tokens)] == 12
    assert s[("fleetserve_gateway_prompt_tokens_total", tokens)] == 14
    requests = "fleetserve_gateway_requests_total"
    assert s[(requests, frozenset({("model", "m"), ("status", "200"), ("key", "team")}))] == 2
    assert s[(requests, frozenset({("model", "unknown"), ("status", "404"), ("key", "none")}))] == 1
    # a request refused before any engine was asked has a duration, no gateway/engine split
    assert (f"{added}_count", frozenset({("model", "unknown")})) not in s
    duration = "fleetserve_gateway_request_duration_seconds"
    buckets = [
        s[(f"{duration}_bucket", frozenset({("model", "m"), ("stream", "true"), ("le", le)}))]
        for le in [*(str(b) for b in constants.REQUEST_DURATION_BUCKETS_S), "+Inf"]
    ]
    assert buckets == sorted(buckets) and buckets[-1] == 2  # cumulative
