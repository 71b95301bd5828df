"""Per-model load figures and the `neuron_*` Prometheus families (per-app registry)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.wire import MODEL_STATES, ModelHealth, Phase


@attrs.define
class ModelStats:
    """What the proxy observes of one model's traffic."""

    prefilling: int = 0
    decoding: int = 0
    ttft_s: float | None = None
    decode_tps: float | None = None
    last_used: float = attrs.Factory(time.time)
    # time.monotonic() of the last byte from the runner (or of a request's start);
    # the supervisor's stall watchdog reads it.
    last_byte_at: float = attrs.Factory(time.monotonic)

    @property
    def phase(self) -> Phase:
        if self.prefilling:
            return "prefill"
        if self.decoding:
            return "decode"
        return "idle"


# The supervisor gives the collector a fresh snapshot at every scrape.
Snapshot = Callable[[], Iterable[ModelHealth]]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPS_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)


class _LiveCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "neuron_model_in_flight_requests", "Requests running on the runner", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "neuron_model_queue_depth_requests", "Requests waiting for a slot", labels=["model"]
        )
        state = GaugeMetricFamily(
            "neuron_model_state", "1 for the model's current state", labels=["model", "state"]
        )
        tps = GaugeMetricFamily(
            "neuron_model_decode_tokens_per_second",
            "Decode speed of the last finished stream",
            labels=["model"],
        )
        for m in self._snapshot():
            in_flight.add_metric([m.model_id], m.in_flight)
            queued.add_metric([m.model_id], m.queue_depth)
            for s in MODEL_STATES:
                state.add_metric([m.model_id, s], 1.0 if m.state == s else 0.0)
            if m.decode_tps is not None:
                tps.add_metric([m.model_id], m.decode_tps)
        yield from (in_flight, queued, state, tps)


@attrs.define
class NeuronMetrics:
    registry: CollectorRegistry
    requests: Counter
    rejected: Counter
    ttft: Histogram
    decode_tps: Histogram
    load_seconds: Histogram
    runner_crashes: Counter
    stream_errors: Counter

    @classmethod
    def create(cls) -> NeuronMetrics:
        r = CollectorRegistry(auto_describe=True)
        return cls(
            registry=r,
            requests=Counter(
                "neuron_requests", "Proxied requests by outcome", ["model", "outcome"], registry=r
            ),
            rejected=Counter(
                "neuron_rejected_requests",
                "Requests refused before the runner",
                ["model", "code"],
                registry=r,
            ),
            ttft=Histogram(
                "neuron_time_to_first_token_seconds",
                "Request start to first SSE data frame",
                ["model"],
                buckets=TTFT_BUCKETS,
                registry=r,
            ),
            decode_tps=Histogram(
                "neuron_decode_tokens_per_second",
                "Per stream: data frames after the first, per second",
                ["model"],
                buckets=TPS_BUCKETS,
                registry=r,
            ),
            load_seconds=Histogram(
                "neuron_runner_load_seconds",
                "Runner start to warmed up",
                ["model"],
                buckets=LOAD_BUCKETS,
                registry=r,
            ),
            runner_crashes=Counter(
                "neuron_runner_crashes", "Runners that exited unasked", ["model"], registry=r
            ),
            stream_errors=Counter(
                "neuron_stream_errors",
                "Streams ended with an error frame",
                ["model", "reason"],
                registry=r,
            ),
        )

    def watch(self, snapshot: Snapshot) -> None:
        self.registry.register(_LiveCollector(snapshot))
