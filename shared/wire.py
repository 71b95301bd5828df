"""Wire records exchanged between cortex and neuron.

Frozen attrs records; (de)serialisation stays at the edge in explicit
`from_json` / `to_json` so the records themselves never see raw dicts.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

ModelState = Literal["loading", "warming", "ready", "recovering", "failed", "unloading"]
Phase = Literal["prefill", "decode", "idle"]
NodeStatus = Literal["idle", "busy", "degraded"]
Backend = Literal["ring", "jaccl"]
Sharding = Literal["tensor", "pipeline"]

MODEL_STATES: tuple[str, ...] = ("loading", "warming", "ready", "recovering", "failed", "unloading")


@attrs.frozen
class RdmaPort:
    device: str
    port: int
    state: str  # "PORT_ACTIVE", "PORT_DOWN", ...

    @property
    def active(self) -> bool:
        return self.state.upper().endswith("ACTIVE")

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "port": self.port, "state": self.state}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RdmaPort:
        return cls(device=str(d["device"]), port=int(d["port"]), state=str(d["state"]))


@attrs.frozen
class Discovery:
    """What a node is: answered by GET /discovery."""

    node_id: str
    hostname: str
    version: str
    os: str
    kernel: str
    arch: str
    chip: str
    memory_total_bytes: int
    memory_available_bytes: int
    unified_memory: bool
    mlx_version: str
    mlx_device: str  # "metal" | "cuda" | "cpu"
    recommended_working_set_bytes: int | None
    backends: tuple[str, ...]
    rdma_ports: tuple[RdmaPort, ...]
    disk_free_bytes: int
    store_dir: str
    # Address peers use to reach this node's ranks over TCP (ring backend).
    ring_host: str
    started_at: float

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["backends"] = list(self.backends)
        d["rdma_ports"] = [p.to_json() for p in self.rdma_ports]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Discovery:
        fields = {f.name for f in attrs.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["backends"] = tuple(str(b) for b in d.get("backends", ()))
        kw["rdma_ports"] = tuple(RdmaPort.from_json(p) for p in d.get("rdma_ports", ()))
        return cls(**kw)


@attrs.frozen
class GroupSpec:
    """One member's view of a multi-rank runner group, sent by cortex at load."""

    group_id: str
    rank: int
    world_size: int
    backend: Backend
    sharding: Sharding
    # ring: "host:port" of every rank, in rank order (becomes MLX_HOSTFILE).
    hosts: tuple[str, ...] = ()
    # jaccl: coordinator "host:port" and this rank's RDMA device row.
    coordinator: str | None = None
    ibv_devices: tuple[tuple[str | None, ...], ...] = ()
    # pipeline: layers per rank, in rank order (placement's proportional split);
    # empty means mlx_lm's even split.
    layer_split: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "rank": self.rank,
            "world_size": self.world_size,
            "backend": self.backend,
            "sharding": self.sharding,
            "hosts": list(self.hosts),
            "coordinator": self.coordinator,
            "ibv_devices": [list(r) for r in self.ibv_devices],
            "layer_split": list(self.layer_split),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GroupSpec:
        backend = d.get("backend", "ring")
        sharding = d.get("sharding", "tensor")
        if backend not in ("ring", "jaccl"):
            raise ValueError(f"group.backend must be ring or jaccl, not {backend!r}")
        if sharding not in ("tensor", "pipeline"):
            raise ValueError(f"group.sharding must be tensor or pipeline, not {sharding!r}")
        rank, world = int(d["rank"]), int(d["world_size"])
        if not 0 <= rank < world:
            raise ValueError(f"group.rank {rank} outside world size {world}")
        hosts = tuple(str(h) for h in d.get("hosts", ()))
        ibv = tuple(tuple(r) for r in d.get("ibv_devices", ()))
        coordinator = d.get("coordinator")
        if world > 1 and backend == "ring" and len(hosts) != world:
            raise ValueError(f"group.hosts must name {world} ranks for ring, not {len(hosts)}")
        if world > 1 and backend == "jaccl" and (not coordinator or len(ibv) != world):
            raise ValueError(f"a jaccl group needs a coordinator and {world} ibv_devices rows")
        return cls(
            group_id=str(d["group_id"]),
            rank=rank,
            world_size=world,
            backend=backend,
            sharding=sharding,
            hosts=hosts,
            coordinator=coordinator,
            ibv_devices=ibv,
            layer_split=_layer_split(d.get("layer_split", ()), world),
        )


def _layer_split(raw: Any, world: int) -> tuple[int, ...]:
    split = tuple(raw or ())
    if split and (len(split) != world or not all(isinstance(x, int) and x > 0 for x in split)):
        raise ValueError(f"group.layer_split must be {world} positive integers, not {raw!r}")
    return split


@attrs.frozen
class LoadRequest:
    model_id: str
    source: str
    group: GroupSpec | None = None
    warmup_deadline_s: float | None = None
    # Tokens of prompt plus output the model may take; None: from its config.json.
    context_limit: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "group": None if self.group is None else self.group.to_json(),
            "warmup_deadline_s": self.warmup_deadline_s,
            "context_limit": self.context_limit,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoadRequest:
        if not isinstance(d.get("model_id"), str) or not d["model_id"]:
            raise ValueError("model_id must be a non-empty string")
        source = d.get("source", d["model_id"])
        if not isinstance(source, str) or not source:
            raise ValueError("source must be a non-empty string")
        group = d.get("group")
        deadline = d.get("warmup_deadline_s")
        if deadline is not None and (
            not isinstance(deadline, (int, float)) or isinstance(deadline, bool) or deadline <= 0
        ):
            raise ValueError("warmup_deadline_s must be a positive number")
        context = d.get("context_limit")
        if context is not None and (
            not isinstance(context, int) or isinstance(context, bool) or context < 1
        ):
            raise ValueError("context_limit must be a positive integer")
        return cls(
            model_id=d["model_id"],
            source=source,
            group=None if group is None else GroupSpec.from_json(group),
            warmup_deadline_s=None if deadline is None else float(deadline),
            context_limit=context,
        )


@attrs.frozen
class ModelStatus:
    """One local model as GET /models reports it."""

    model_id: str
    state: ModelState
    source: str
    group: GroupSpec | None
    port: int | None
    memory_bytes: int
    last_used: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "state": self.state,
            "source": self.source,
            "group": None if self.group is None else self.group.to_json(),
            "port": self.port,
            "memory_bytes": self.memory_bytes,
            "last_used": self.last_used,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelStatus:
        g = d.get("group")
        return cls(
            model_id=str(d["model_id"]),
            state=d["state"],
            source=str(d.get("source", d["model_id"])),
            group=None if g is None else GroupSpec.from_json(g),
            port=d.get("port"),
            memory_bytes=int(d.get("memory_bytes", 0)),
            last_used=float(d.get("last_used", 0.0)),
            error=d.get("error"),
        )


@attrs.frozen
class ModelHealth:
    """Per-model load figures inside GET /health."""

    model_id: str
    state: ModelState
    in_flight: int
    queue_depth: int
    phase: Phase
    decode_tps: float | None
    ttft_s: float | None
    last_used: float

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelHealth:
        return cls(
            model_id=str(d["model_id"]),
            state=d["state"],
            in_flight=int(d.get("in_flight", 0)),
            queue_depth=int(d.get("queue_depth", 0)),
            phase=d.get("phase", "idle"),
            decode_tps=d.get("decode_tps"),
            ttft_s=d.get("ttft_s"),
            last_used=float(d.get("last_used", 0.0)),
        )


@attrs.frozen
class NodeHealth:
    """GET /health of a neuron."""

    status: NodeStatus
    node_id: str
    started_at: float
    uptime_s: float
    memory_available_bytes: int
    models: tuple[ModelHealth, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "node_id": self.node_id,
            "started_at": self.started_at,
            "uptime_s": self.uptime_s,
            "memory_available_bytes": self.memory_available_bytes,
            "models": [m.to_json() for m in self.models],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NodeHealth:
        return cls(
            status=d["status"],
            node_id=str(d.get("node_id", "")),
            started_at=float(d.get("started_at", 0.0)),
            uptime_s=float(d.get("uptime_s", 0.0)),
            memory_available_bytes=int(d.get("memory_available_bytes", 0)),
            models=tuple(ModelHealth.from_json(m) for m in d.get("models", ())),
        )
