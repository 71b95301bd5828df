"""Prometheus metrics of one cortex app, on its own registry (no module globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import attrs
from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from cortex.core.state import NodeState
from shared.build_info import BUILD_LABELS, build_labels
from shared.metric_children import Children, M

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

# Every value a label takes, so each series exists at 0 before its first event:
# increase() over a series born mid-burst reads the burst as nothing.
# cortex_requests_total{code}: the HTTP status answered, or how a stream ended
# once its 200 was sent (a completed one stays "200").
STREAM_ERROR = "stream_error"
CLIENT_CLOSED = "client_closed"
REQUEST_CODES = (
    "200",
    "400",
    "401",
    "403",
    "404",
    "413",
    "429",
    "500",
    "502",
    "503",
    STREAM_ERROR,
    CLIENT_CLOSED,
)
# Why a stream that had sent its first byte ended in an error frame.
STREAM_ERROR_REASONS = ("upstream_error", "stalled", "lost", "node_down", "shutdown")
# Why an attempt was retried on another replica before the client saw anything.
RETRY_REASONS = (
    "connect",
    "no_answer",
    "no_first_byte",
    "queue_full",
    "gone",
    "node_down",
    "runner_fault",
    "upstream_5xx",
)
COLD_LOAD_RESULTS = ("ok", "failed")
# A cold load can hold a request this long (load_wait_s, default 300 s).
_QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# (model id, replicas wanted, replicas present) of every catalogue model, at each scrape.
ReplicaCounts = Callable[[], Iterable[tuple[str, int, int]]]


class _ReplicaCollector(Collector):
    def __init__(self, counts: ReplicaCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        wanted = GaugeMetricFamily(
            "cortex_model_replicas_wanted",
            "Replicas the catalogue keeps loaded without requests (keep_loaded, pinned_on)",
            labels=["model"],
        )
        present = GaugeMetricFamily(
            "cortex_model_replicas_present",
            "Replicas loaded or loading on healthy nodes (a group counts once)",
            labels=["model"],
        )
        for model, want, have in self._counts():
            wanted.add_metric([model], want)
            present.add_metric([model], have)
        yield from (wanted, present)


@attrs.define
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    first_byte: Histogram
    in_flight: Gauge
    upstream_retries: Counter
    passive_failures: Counter
    stream_errors: Counter
    node_healthy: Gauge
    node_failures: Gauge
    cold_loads: Counter
    cold_load_duration: Histogram
    evictions: Counter
    queue_wait: Histogram
    node_memory: Gauge
    build_info: Gauge
    poll_round: Gauge
    # Model labels are catalogue ids only; anything else is "other" (bounded cardinality).
    models: frozenset[str] = frozenset()
    _node_seen: dict[str, tuple[bool, int]] = attrs.field(factory=dict, init=False)
    # The request path's labelled children, looked up once (shared.metric_children).
    _children: Children = attrs.field(factory=Children, init=False)

    @classmethod
    def create(cls, models: Iterable[str] = (), nodes: Iterable[str] = ()) -> Metrics:
        # `_created` series double every counter's output and nothing reads them
        # (a process-wide switch of prometheus_client; idempotent).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = CollectorRegistry(auto_describe=True)
        out = cls(
            registry=r,
            requests=Counter(
                "cortex_requests_total",
                "Requests answered, by model, HTTP status and client API",
                ["model", "code", "api"],
                registry=r,
            ),
            request_duration=Histogram(
                "cortex_request_duration_seconds",
                "Time from request to the last byte of the answer",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            first_byte=Histogram(
                "cortex_time_to_first_byte_seconds",
                "Time from request to the first byte from a replica",
                ["model"],
                buckets=_LATENCY_BUCKETS,
                registry=r,
            ),
            in_flight=Gauge(
                "cortex_requests_in_flight",
                "Requests being proxied now",
                ["model"],
                registry=r,
            ),
            upstream_retries=Counter(
                "cortex_upstream_retries_total",
                "Requests retried on another replica before their first byte, by reason",
                ["reason"],
                registry=r,
            ),
            passive_failures=Counter(
                "cortex_passive_failures_total",
                "Proxied requests that could not reach a node",
                ["node"],
                registry=r,
            ),
            stream_errors=Counter(
                "cortex_stream_errors_total",
                "Streams that ended in an error frame after their first byte (cortex's own"
                " or a neuron's relayed), by reason",
                ["model", "reason"],
                registry=r,
            ),
            node_healthy=Gauge(
                "cortex_node_healthy", "1 when the node is routed to", ["node"], registry=r
            ),
            node_failures=Gauge(
                "cortex_node_consecutive_failures",
                "Failed polls in a row",
                ["node"],
                registry=r,
            ),
            cold_loads=Counter(
                "cortex_cold_loads_total",
                "Loads cortex started, by model and result (ok, failed)",
                ["model", "result"],
                registry=r,
            ),
            cold_load_duration=Histogram(
                "cortex_cold_load_duration_seconds",
                "Time from starting a load to the model being ready",
                ["model"],
                buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1200),
                registry=r,
            ),
            evictions=Counter(
                "cortex_evictions_total",
                "Idle models unloaded to make room for another",
                ["model"],
                registry=r,
            ),
            queue_wait=Histogram(
                "cortex_queue_wait_seconds",
                "Time a request waited in cortex for a replica to route to (a cold load,"
                " a model loading), per attempt; 0 when one was ready",
                ["model"],
                buckets=_QUEUE_WAIT_BUCKETS,
                registry=r,
            ),
            node_memory=Gauge(
                "cortex_node_memory_available_bytes",
                "Memory routing counts free on the node: its last poll less loads under way"
                " (the neuron's own neuron_memory_available_bytes is the machine's figure)",
                ["node"],
                registry=r,
            ),
            build_info=Gauge(
                "cortex_build_info",
                "1, labelled with the versions this cortex runs",
                list(BUILD_LABELS),
                registry=r,
            ),
            poll_round=Gauge(
                "cortex_poll_round_seconds",
                "Wall time of the last poll round over every node",
                registry=r,
            ),
            models=frozenset(models),
        )
        out.build_info.labels(*build_labels()).set(1)
        out._preinitialise((*sorted(out.models), "other"), tuple(nodes))
        return out

    def add_models(self, ids: Iterable[str]) -> None:
        """Models a reload added to the catalogue: labelled by name from now on (a
        removed one keeps its series; its name stays a bounded label)."""
        new = tuple(sorted(set(ids) - self.models))
        self.models = self.models | set(new)
        self._preinitialise(new, ())

    def _preinitialise(self, models: tuple[str, ...], nodes: tuple[str, ...]) -> None:
        for model in models:
            for code in REQUEST_CODES:
                # Series start at 0 for the chat API; the others appear when first used.
                self.requests.labels(model, code, "chat")
            for reason in STREAM_ERROR_REASONS:
                self.stream_errors.labels(model, reason)
            for result in COLD_LOAD_RESULTS:
                self.cold_loads.labels(model, result)
            self.evictions.labels(model)
            self.request_duration.labels(model)
            self.first_byte.labels(model)
            self.in_flight.labels(model)
            self.cold_load_duration.labels(model)
            self.queue_wait.labels(model)
        for reason in RETRY_REASONS:
            self.upstream_retries.labels(reason)
        for node in nodes:
            self.passive_failures.labels(node)
            self.node_healthy.labels(node)
            self.node_failures.labels(node)
            self.node_memory.labels(node)

    def child(self, family: M, *values: str) -> M:
        """`family.labels(*values)`, cached."""
        return self._children.get(family, *values)

    def model(self, name: str | None) -> str:
        return name if name is not None and name in self.models else "other"

    def observe_node(self, node: NodeState) -> None:
        # Called per node per poll: unchanged figures (nearly all of them) cost a lookup.
        now = (node.healthy, node.failures)
        if self._node_seen.get(node.name) == now:
            return
        self._node_seen[node.name] = now
        self.node_healthy.labels(node.name).set(1 if node.healthy else 0)
        self.node_failures.labels(node.name).set(node.failures)
        self.node_memory.labels(node.name).set(node.memory_available_bytes)

    def watch_replicas(self, counts: ReplicaCounts) -> None:
        self.registry.register(_ReplicaCollector(counts))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Where the app keeps its metrics.
METRICS = web.AppKey("metrics", Metrics)
