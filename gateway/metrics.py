"""Prometheus metrics of one gateway process (a registry per app, no globals).

The request path only adds to plain dicts and lists; the Prometheus families
are built at scrape time by a collector. A gateway process is one asyncio loop,
so nothing needs a lock, and recording a request costs a few dictionary
updates instead of prometheus_client's locked counters per metric.

What splits gateway time from engine time: ``fleetserve_gateway_added_seconds``
is the time a request spent in the gateway minus the time it waited on engines
(every attempt); time to first token and time per output token are seen from
the gateway, i.e. what the client gets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fleetserve import constants
from gateway.breaker import Circuit, CircuitBreakers
from gateway.usage import UsageMeter

Labels = tuple[str, ...]

#: The ``key`` label of requests when the gateway has no keys or the key was refused.
NO_KEY = "none"
_CIRCUIT_VALUES = {Circuit.CLOSED: 0, Circuit.HALF_OPEN: 1, Circuit.OPEN: 2}


class _Counters:
    """One counter family: values by label values."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name  # without _total: the exposition adds it
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in sorted(self.values.items()):
            family.add_metric(list(labels), value)
        return family


class _Histograms:
    """One histogram family: per label values, a count per bucket (not cumulative) and a sum."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = sorted(buckets)
        self.values: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        child = self.values.get(labels)
        if child is None:
            child = self.values[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        # bisect_left: the first bound >= value, Prometheus's "le" (the last slot is +Inf)
        child[0][bisect_left(self.bounds, value)] += 1
        child[1][0] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in sorted(self.values.items()):
            cumulative = 0
            buckets = []
            bounds = [*map(floatToGoString, self.bounds), "+Inf"]
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, total[0])
        return family


@dataclass(slots=True)
class RequestRecord:
    """What the gateway learns about one proxied request on its way through."""

    #: Its arrival, by time.perf_counter (its latencies count from here) and by the gateway's
    #: clock (gateway/clock.py: its hold counts from here).
    started: float
    arrived: float
    model: str = "unknown"
    key: str = NO_KEY
    stream: bool = False
    #: Seconds spent waiting on engines, every attempt together.
    upstream_s: float = 0.0
    #: When the answer (streams: its head and first chunk) was ready to go to the client.
    answered: float = 0.0
    status: int = 0
    meter: UsageMeter | None = None
    #: Seconds spent tokenizing the prompt for routing (0: the policy did not ask).
    tokenize_s: float = 0.0


class GatewayMetrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.in_flight = 0
        self.requests = _Counters(
            "fleetserve_gateway_requests",
            "Requests answered, by model, HTTP status and API key name.",
            ["model", "status", "key"],
        )
        self.duration = _Histograms(
            "fleetserve_gateway_request_duration_seconds",
            "Request latency seen by the client: arrival to the answer's last byte.",
            ["model", "stream"],
            constants.REQUEST_DURATION_BUCKETS_S,
        )
        self.ttft = _Histograms(
            "fleetserve_gateway_time_to_first_token_seconds",
            "Streams: arrival to the first chunk of the answer going to the client.",
            ["model"],
            constants.TTFT_BUCKETS_S,
        )
        self.tpot = _Histograms(
            "fleetserve_gateway_time_per_output_token_seconds",
            "Streams: time after the first chunk divided by the output tokens after the first.",
            ["model"],
            constants.TPOT_BUCKETS_S,
        )
        self.added = _Histograms(
            "fleetserve_gateway_added_seconds",
            "Time the gateway itself took per request: arrival to the answer being ready for "
            "the client, minus the time spent waiting on engines.",
            ["model"],
            constants.GATEWAY_ADDED_BUCKETS_S,
        )
        self.prompt_tokens = _Counters(
            "fleetserve_gateway_prompt_tokens",
            "Prompt (input) tokens, from the engines' usage reports.",
            ["model", "key"],
        )
        self.completion_tokens = _Counters(
            "fleetserve_gateway_completion_tokens",
            "Completion (output) tokens, from the engines' usage reports.",
            ["model", "key"],
        )
        self.retries = _Counters(
            "fleetserve_gateway_retries",
            "Attempts sent to another worker after one failed before the first byte.",
            ["model"],
        )
        self.fallbacks = _Counters(
            "fleetserve_gateway_fallbacks",
            "Requests sent to a fallback model, by the model asked for and the fallback tried.",
            ["model", "fallback"],
        )
        self.upstream_failures = _Counters(
            "fleetserve_gateway_upstream_failures",
            "Upstream attempts that failed before the first byte (then retried elsewhere).",
            ["worker"],
        )
        self.mid_stream_failures = _Counters(
            "fleetserve_gateway_upstream_mid_stream_failures",
            "Streams a worker broke after they started (resumed on another worker where "
            "possible: see fleetserve_gateway_resumes_total).",
            ["worker"],
        )
        self.resumes = _Counters(
            "fleetserve_gateway_resumes",
            "Streams that broke mid-way, by outcome: resumed (another worker took over), "
            "ended (the answer was whole, only its end was lost); else the client got an "
            "error event: unsupported (cannot resume exactly), budget (retry budget spent), "
            "no_worker, exhausted (resumed max_resumes times), failed (every try failed).",
            ["model", "outcome"],
        )
        self.replayed_tokens = _Counters(
            "fleetserve_gateway_resume_replayed_tokens",
            "Generated tokens sent again, as prompt, to the worker resuming a stream.",
            ["model"],
        )
        self.resume_time = _Histograms(
            "fleetserve_gateway_resume_seconds",
            "Time to resume a stream: from its break to the new worker's first chunk.",
            ["model"],
            constants.RESUME_BUCKETS_S,
        )
        self.retries_refused = _Counters(
            "fleetserve_gateway_retries_refused",
            "Retries and resumes the retry budget refused (the request failed instead).",
            ["model"],
        )
        #: Set by the proxy: the circuit of every worker that failed lately.
        self.circuits: CircuitBreakers | None = None
        self.tokenize = _Histograms(
            "fleetserve_gateway_tokenize_seconds",
            "Time spent tokenizing a prompt for cache-aware routing (kv_events policy only).",
            ["model"],
            constants.GATEWAY_ADDED_BUCKETS_S,
        )
        #: Requests held now, by model: waiting for a ready worker of a declared model.
        self.held: dict[str, int] = {}
        self.holds = _Histograms(
            "fleetserve_gateway_hold_seconds",
            "Requests held for a declared model with no ready worker: how long, by outcome "
            "(ready: a worker became ready; timed_out: 503 after hold_timeout_s or the "
            "request timeout; gone: the model is no longer declared).",
            ["model", "outcome"],
            constants.REQUEST_DURATION_BUCKETS_S,
        )
        self._families: list[_Counters | _Histograms] = [
            self.holds,
            self.tokenize,
            self.requests,
            self.duration,
            self.ttft,
            self.tpot,
            self.added,
            self.prompt_tokens,
            self.completion_tokens,
            self.retries,
            self.fallbacks,
            self.upstream_failures,
            self.mid_stream_failures,
            self.resumes,
            self.replayed_tokens,
            self.resume_time,
            self.retries_refused,
        ]
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "fleetserve_gateway_in_flight_requests",
            "Requests being proxied now.",
            value=self.in_flight,
        )
        held = GaugeMetricFamily(
            "fleetserve_gateway_held_requests",
            "Requests waiting now for a ready worker of a declared model (starting, "
            "restarting, scaled to zero).",
            labels=["model"],
        )
        for model, count in sorted(self.held.items()):
            held.add_metric([model], count)
        yield held
        for family in self._families:
            yield family.family()
        yield from self._circuit_families()

    def _circuit_families(self) -> Iterator[Metric]:
        states = self.circuits.states() if self.circuits is not None else {}
        state = GaugeMetricFamily(
            "fleetserve_gateway_worker_circuit_state",
            "Circuit of each worker that failed lately: 0 closed, 1 half-open (one probe "
            "request may go), 2 open (no requests); workers with no recent failure are absent.",
            labels=["worker"],
        )
        for worker, (circuit, _) in sorted(states.items()):
            state.add_metric([worker], _CIRCUIT_VALUES[circuit])
        yield state
        opened = CounterMetricFamily(
            "fleetserve_gateway_circuit_opened",
            "Times a worker's circuit opened (taken out of rotation after failures).",
            labels=["worker"],
        )
        for worker, count in sorted((self.circuits.opened if self.circuits else {}).items()):
            opened.add_metric([worker], count)
        yield opened

    def record(self, record: RequestRecord, ended: float) -> None:
        """Account one finished request (streams: after their last byte)."""
        model = record.model
        self.requests.inc((model, str(record.status), record.key))
        self.duration.observe((model, "true" if record.stream else "false"), ended - record.started)
        if record.tokenize_s:
            self.tokenize.observe((model,), record.tokenize_s)
        if not record.answered:
            return  # refused before any engine was asked
        self.added.observe((model,), max(0.0, record.answered - record.started - record.upstream_s))
        meter = record.meter
        completion = meter.completion_tokens if meter is not None else 0
        if meter is not None and meter.prompt_tokens:
            self.prompt_tokens.inc((model, record.key), meter.prompt_tokens)
        if completion:
            self.completion_tokens.inc((model, record.key), completion)
        if record.stream and record.status == 200:
            self.ttft.observe((model,), record.answered - record.started)
            if completion > 1:
                self.tpot.observe((model,), (ended - record.answered) / (completion - 1))
