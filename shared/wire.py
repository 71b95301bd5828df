"""Wire records exchanged between cortex and neuron.

Frozen attrs records; (de)serialisation stays at the edge in explicit
`from_json` / `to_json` so the records themselves never see raw dicts.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from shared.kinds import ModelKind, parse_kind
from shared.model_id import RULE as MODEL_ID_RULE
from shared.model_id import is_valid as is_model_id
from shared.runner_options import OptionError, RunnerOptions
from shared.sensors import Sensors

ModelState = Literal["loading", "warming", "ready", "stalled", "recovering", "failed", "unloading"]
Phase = Literal["prefill", "decode", "idle"]
NodeStatus = Literal["idle", "busy", "degraded", "draining"]
Backend = Literal["ring", "jaccl"]
Sharding = Literal["tensor", "pipeline"]

MODEL_STATES: tuple[str, ...] = (
    "loading",
    "warming",
    "ready",
    "stalled",
    "recovering",
    "failed",
    "unloading",
)
# Marks doctor's 2-token probe: the neuron serves it but does not count it as a use,
# so probing never keeps an idle model from its idle unload.
PROBE_HEADER = "X-Cortex-Probe"


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
    # For doctor's alignment check and disk percentages (absent from older neurons).
    mlx_lm_version: str = ""
    python_version: str = ""
    disk_total_bytes: int = 0

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
    def from_json(cls, d: Any, where: str = "group") -> GroupSpec:
        """Strictly: a wrong type anywhere is a FieldError naming the field."""
        if not isinstance(d, dict):
            raise FieldError(where, f"must be an object, not {_jtype(d)}")
        backend = d.get("backend", "ring")
        sharding = d.get("sharding", "tensor")
        if backend not in ("ring", "jaccl"):
            raise FieldError(f"{where}.backend", f"must be ring or jaccl, not {backend!r}")
        if sharding not in ("tensor", "pipeline"):
            raise FieldError(f"{where}.sharding", f"must be tensor or pipeline, not {sharding!r}")
        group_id = d.get("group_id")
        if not isinstance(group_id, str) or not group_id:
            raise FieldError(f"{where}.group_id", "must be a non-empty string")
        rank = _int(d.get("rank"), f"{where}.rank")
        world = _int(d.get("world_size"), f"{where}.world_size")
        if not 1 <= world <= MAX_WORLD_SIZE:
            raise FieldError(f"{where}.world_size", f"must be 1..{MAX_WORLD_SIZE}, not {world}")
        if not 0 <= rank < world:
            raise FieldError(f"{where}.rank", f"{rank} is outside world size {world}")
        hosts = tuple(_strs(d.get("hosts", []), f"{where}.hosts"))
        rows = d.get("ibv_devices", [])
        if not isinstance(rows, list):
            raise FieldError(f"{where}.ibv_devices", f"must be an array, not {_jtype(rows)}")
        ibv = tuple(
            tuple(_strs(r, f"{where}.ibv_devices[{i}]", none_ok=True)) for i, r in enumerate(rows)
        )
        coordinator = d.get("coordinator")
        if coordinator is not None and not isinstance(coordinator, str):
            raise FieldError(f"{where}.coordinator", "must be a string or null")
        if world > 1 and backend == "ring" and len(hosts) != world:
            raise FieldError(
                f"{where}.hosts", f"must name {world} ranks for ring, not {len(hosts)}"
            )
        if world > 1 and backend == "jaccl" and (not coordinator or len(ibv) != world):
            raise FieldError(
                f"{where}.coordinator", f"a jaccl group needs a coordinator and {world} ibv_devices"
            )
        return cls(
            group_id=group_id,
            rank=rank,
            world_size=world,
            backend=backend,
            sharding=sharding,
            hosts=hosts,
            coordinator=coordinator,
            ibv_devices=ibv,
            layer_split=_layer_split(d.get("layer_split", []), world, f"{where}.layer_split"),
        )


MAX_WORLD_SIZE = 1024
MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096


class FieldError(ValueError):
    """A field with the wrong type or value; `param` names it (dotted for nested ones)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _jtype(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else "?")


def _int(value: Any, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FieldError(param, f"must be an integer, not {_jtype(value)}")
    return value


def _strs(value: Any, param: str, *, none_ok: bool = False) -> list[Any]:
    if not isinstance(value, list) or not all(
        isinstance(v, str) or (none_ok and v is None) for v in value
    ):
        raise FieldError(param, "must be an array of strings")
    return value


def _layer_split(raw: Any, world: int, param: str = "group.layer_split") -> tuple[int, ...]:
    if raw is None:
        return ()
    if (
        not isinstance(raw, list | tuple)
        or (raw and len(raw) != world)
        or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in raw)
    ):
        raise FieldError(param, f"must be {world} positive integers, not {raw!r}"[:200])
    return tuple(raw)


@attrs.frozen
class LoadRequest:
    model_id: str
    source: str
    group: GroupSpec | None = None
    warmup_deadline_s: float | None = None
    # Tokens of prompt plus output the model may take; None: from its config.json.
    context_limit: int | None = None
    # Neurons (base URLs) holding a staged copy of a hub source: staged from them first.
    peers: tuple[str, ...] = ()
    # Which runner serves it: mlx_lm.server (chat) or the embedding runner.
    kind: ModelKind = "chat"
    # The catalogue's runner options for this model (draft, adapters, template...).
    options: RunnerOptions = attrs.Factory(RunnerOptions)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_id": self.model_id,
            "source": self.source,
            "group": None if self.group is None else self.group.to_json(),
            "warmup_deadline_s": self.warmup_deadline_s,
            "context_limit": self.context_limit,
        }
        if self.peers:  # absent otherwise: a neuron that predates peers still parses it
            out["peers"] = list(self.peers)
        if self.kind != "chat":  # likewise; an older neuron refuses it, rightly
            out["kind"] = self.kind
        if not self.options.empty:  # likewise
            out["options"] = self.options.to_json()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoadRequest:
        """Strictly: a wrong type or an unknown field is a FieldError naming it."""
        unknown = sorted(set(d) - {f.name for f in attrs.fields(cls)})
        if unknown:
            raise FieldError(unknown[0][:100], "is not a load request field")
        model_id = d.get("model_id")
        if not is_model_id(model_id):  # the fleet's one charset; the id is not echoed
            raise FieldError("model_id", f"must be a model id: {MODEL_ID_RULE}")
        source = d.get("source", model_id)
        if not isinstance(source, str) or not 0 < len(source) <= MAX_PATH_CHARS:
            raise FieldError("source", f"must be a string of 1..{MAX_PATH_CHARS} characters")
        if "\x00" in source or "\x00" in model_id:
            raise FieldError("source" if "\x00" in source else "model_id", "holds a NUL byte")
        group = d.get("group")
        deadline = d.get("warmup_deadline_s")
        if deadline is not None and (
            not isinstance(deadline, (int, float))
            or isinstance(deadline, bool)
            or not 0 < deadline < float("inf")
        ):
            raise FieldError("warmup_deadline_s", "must be a positive number")
        context = d.get("context_limit")
        if context is not None and (
            not isinstance(context, int) or isinstance(context, bool) or context < 1
        ):
            raise FieldError("context_limit", "must be a positive integer")
        try:
            kind = parse_kind(d.get("kind", "chat"))
        except ValueError as exc:
            raise FieldError("kind", str(exc).removeprefix("kind ")) from exc
        spec = None if group is None else GroupSpec.from_json(group)
        if kind == "embedding" and spec is not None and spec.world_size > 1:
            raise FieldError("group", "must be absent: an embedding model runs on one node")
        return cls(
            model_id=model_id,
            source=source,
            group=spec,
            warmup_deadline_s=None if deadline is None else float(deadline),
            context_limit=context,
            peers=parse_peers(d.get("peers")),
            kind=kind,
            options=parse_options(d.get("options"), kind, spec, context),
        )


def parse_options(
    value: Any, kind: ModelKind, group: GroupSpec | None, context_limit: int | None
) -> RunnerOptions:
    """A load's `options`, checked as the catalogue checks them (FieldError naming the key)."""
    try:
        options = RunnerOptions.from_json(value)
        world = 1 if group is None else group.world_size
        options.check_for(kind=kind, world_size=world, context_limit=context_limit)
    except OptionError as exc:
        raise FieldError(f"options.{exc.param}", exc.what) from exc
    return options


MAX_PEERS = 16


def parse_peers(value: Any) -> tuple[str, ...]:
    """`peers`: absent, or an array of at most MAX_PEERS http(s) base URLs."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_PEERS:
        raise FieldError("peers", f"must be an array of at most {MAX_PEERS} URLs")
    for i, p in enumerate(value):
        if (
            not isinstance(p, str)
            or not p.startswith(("http://", "https://"))
            or not 0 < len(p) <= MAX_PATH_CHARS
            or any(c in p for c in "\x00\r\n ")
        ):
            raise FieldError(f"peers[{i}]", "must be an http(s) base URL")
    return tuple(value)


@attrs.frozen
class StageRequest:
    """POST /store/stage: fetch a hub source's files into the store, from peers first."""

    model_id: str
    source: str
    peers: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StageRequest:
        unknown = sorted(set(d) - {"model_id", "source", "peers"})
        if unknown:
            raise FieldError(unknown[0][:100], "is not a stage request field")
        load = LoadRequest.from_json({k: d[k] for k in ("model_id", "source") if k in d})
        return cls(model_id=load.model_id, source=load.source, peers=parse_peers(d.get("peers")))

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "source": self.source, "peers": list(self.peers)}


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
    # While the load stages its files: the stage job (state, bytes, rate, ETA).
    staging: dict[str, Any] | None = None
    # Runner restarts since this load began, and the wall time of the last one.
    restarts: int = 0
    restarted_at: float | None = None
    # Which runner serves it (what a probe of it must ask).
    kind: ModelKind = "chat"
    # Admission: requests run at once and wait at most (None: an older neuron), and
    # the median queue wait of the last admitted requests (None: none yet).
    max_in_flight: int | None = None
    queue_max: int | None = None
    queue_wait_p50_s: float | None = None

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
            "staging": self.staging,
            "restarts": self.restarts,
            "restarted_at": self.restarted_at,
            "kind": self.kind,
            "max_in_flight": self.max_in_flight,
            "queue_max": self.queue_max,
            "queue_wait_p50_s": self.queue_wait_p50_s,
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
            staging=d.get("staging") if isinstance(d.get("staging"), dict) else None,
            restarts=int(d.get("restarts", 0) or 0),
            restarted_at=_opt_float(d.get("restarted_at")),
            # An older neuron says nothing: it runs chat models only.
            kind="embedding" if d.get("kind") == "embedding" else "chat",
            **_admission_fields(d),
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
    # Completion tokens since the runner's model was loaded here: a counter, so a
    # reader derives tok/s from two reads (decode_tps is the last request's figure).
    completion_tokens: int = 0
    # As in ModelStatus: the admission limits and the median queue wait.
    max_in_flight: int | None = None
    queue_max: int | None = None
    queue_wait_p50_s: float | None = None

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
            completion_tokens=int(d.get("completion_tokens", 0)),
            **_admission_fields(d),
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
    # Fresh each read (discovery's figure is only as new as the last restart).
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    # The store's free-space floor (min_free_gb) in bytes.
    min_free_bytes: int | None = None
    # Loads of jaccl-backend group ranks since the neuron started, against its budget.
    jaccl_loads: int = 0
    jaccl_reload_budget: int | None = None
    # CPU load, temperatures, power (shared.sensors): GET /health only, not /status
    # (they move every read and would change its ETag); None when not read.
    sensors: Sensors | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **({} if self.sensors is None else {"sensors": self.sensors.to_json()}),
            "status": self.status,
            "node_id": self.node_id,
            "started_at": self.started_at,
            "uptime_s": self.uptime_s,
            "memory_available_bytes": self.memory_available_bytes,
            "models": [m.to_json() for m in self.models],
            "disk_free_bytes": self.disk_free_bytes,
            "disk_total_bytes": self.disk_total_bytes,
            "min_free_bytes": self.min_free_bytes,
            "jaccl_loads": self.jaccl_loads,
            "jaccl_reload_budget": self.jaccl_reload_budget,
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
            disk_free_bytes=_opt_int(d.get("disk_free_bytes")),
            disk_total_bytes=_opt_int(d.get("disk_total_bytes")),
            min_free_bytes=_opt_int(d.get("min_free_bytes")),
            jaccl_loads=int(d.get("jaccl_loads", 0) or 0),
            jaccl_reload_budget=_opt_int(d.get("jaccl_reload_budget")),
            sensors=Sensors.from_json(d["sensors"]) if d.get("sensors") else None,
        )


def _admission_fields(d: dict[str, Any]) -> dict[str, Any]:
    """ModelStatus's and ModelHealth's admission figures; an older neuron has none."""
    return {
        "max_in_flight": _opt_int(d.get("max_in_flight")),
        "queue_max": _opt_int(d.get("queue_max")),
        "queue_wait_p50_s": _opt_float(d.get("queue_wait_p50_s")),
    }


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
