"""The `neuron_*` Prometheus families (per-app registry)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.build_info import BUILD_LABELS, build_labels
from shared.metric_children import Children, M
from shared.wire import MODEL_STATES, ModelHealth

# `_created` series only double the output (process-wide switch; cortex does the same).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Series made for each model as it is loaded, so that the first increase() counts.
OUTCOMES = ("ok", "upstream_error", "upstream_lost", "client_gone", "runner_broken")
REJECTION_CODES = ("invalid_request", "model_loading", "model_failed", "queue_full")
STREAM_ERROR_REASONS = ("runner_lost", "upstream_error")
TOKEN_KINDS = ("prompt", "completion")

# The supervisor gives the collector a fresh snapshot at every scrape.
Snapshot = Callable[[], Iterable[ModelHealth]]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPS_BUCKETS = (1, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
# Admission waits are bounded by queue_timeout_s (default 30 s).
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@attrs.define
class NodeFigures:
    """This machine's memory and the store's disk, read by `refresh` before each scrape.

    `refresh` blocks (on macOS it runs vm_stat): the scrape calls it off the loop.
    """

    store_dir: Path
    memory: Callable[[], tuple[int, int]]
    memory_total: int = 0
    memory_available: int = 0
    disk_total: int = 0
    disk_free: int = 0

    def refresh(self) -> None:
        self.memory_total, self.memory_available = self.memory()
        try:
            usage = shutil.disk_usage(self.store_dir)
        except OSError:
            # The store not made yet (or gone): leave the last figures.
            return
        self.disk_total, self.disk_free = usage.total, usage.free


class _NodeCollector(Collector):
    def __init__(self, node: NodeFigures) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        n = self._node
        for name, doc, value in (
            ("neuron_memory_total_bytes", "Memory of the machine (or its cgroup)", n.memory_total),
            (
                "neuron_memory_available_bytes",
                "Memory a new runner could take now",
                n.memory_available,
            ),
            ("neuron_disk_total_bytes", "Size of the model store's filesystem", n.disk_total),
            ("neuron_disk_free_bytes", "Free space on the model store's filesystem", n.disk_free),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


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
    tokens: Counter
    queue_wait: Histogram
    build_info: Gauge
    node: NodeFigures | None = None
    # The request path's labelled children, looked up once (shared.metric_children).
    _children: Children = attrs.field(factory=Children, init=False)

    def child(self, family: M, *values: str) -> M:
        """`family.labels(*values)`, cached."""
        return self._children.get(family, *values)

    @classmethod
    def create(cls) -> NeuronMetrics:
        r = CollectorRegistry(auto_describe=True)
        out = cls(
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
                "Per request: completion tokens after the first (runner's usage), per second",
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
            tokens=Counter(
                "neuron_tokens",
                "Tokens by kind, from the runner's usage report",
                ["model", "kind"],
                registry=r,
            ),
            queue_wait=Histogram(
                "neuron_queue_wait_seconds",
                "Time an admitted request waited for a runner slot (0 when one was free);"
                " those that timed out count in neuron_rejected_requests_total{code=queue_full}",
                ["model"],
                buckets=QUEUE_WAIT_BUCKETS,
                registry=r,
            ),
            build_info=Gauge(
                "neuron_build_info",
                "1, labelled with the versions this neuron runs",
                list(BUILD_LABELS),
                registry=r,
            ),
        )
        out.build_info.labels(*build_labels()).set(1)
        return out

    def _by_first_label(self) -> list[tuple[Counter | Histogram, tuple[tuple[str, ...], ...]]]:
        return [
            (self.requests, tuple((o,) for o in OUTCOMES)),
            (self.rejected, tuple((c,) for c in REJECTION_CODES)),
            (self.stream_errors, tuple((r,) for r in STREAM_ERROR_REASONS)),
            (self.tokens, tuple((k,) for k in TOKEN_KINDS)),
            (self.runner_crashes, ((),)),
            (self.ttft, ((),)),
            (self.decode_tps, ((),)),
            (self.load_seconds, ((),)),
            (self.queue_wait, ((),)),
        ]

    def model_added(self, model_id: str) -> None:
        """Make every labelled series of a model, at zero."""
        for metric, rests in self._by_first_label():
            for rest in rests:
                metric.labels(model_id, *rest)

    def model_removed(self, model_id: str) -> None:
        """Drop every series of a model that is gone (a failed record dropped)."""
        self._children.forget(model_id)
        for metric, _ in self._by_first_label():
            # Every label tuple ever used (codes outside the pre-made ones too);
            # prometheus_client offers no public way to list them.
            for labels in list(metric._metrics):
                if labels and labels[0] == model_id:
                    metric.remove(*labels)

    def watch(self, snapshot: Snapshot) -> None:
        self.registry.register(_LiveCollector(snapshot))

    def watch_node(self, node: NodeFigures) -> None:
        self.node = node
        self.registry.register(_NodeCollector(node))
