"""The morning checklist: pass / warn / fail verdicts over a live fleet, each with a fix.

Computed in cortex (GET /admin/doctor) so `cortex doctor` and the dashboard show
the same verdicts. `gather` does the I/O (a fresh /health and /discovery from
every configured node, a 2-token probe of every ready replica); every check is
a pure function of what it gathered and cortex's snapshot, tested without a network.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import attrs

from cortex.config import CortexConfig
from cortex.core.state import FleetSnapshot, NodeModel, NodeState
from shared.kinds import EMBEDDINGS_PATH
from shared.sensors import Figure, Sensors
from shared.wire import PROBE_HEADER, Discovery, NodeHealth

Verdict = Literal["pass", "warn", "fail"]
ORDER: dict[str, int] = {"pass": 0, "warn": 1, "fail": 2}

# Normal ranges (the Hydra runbook): RAM warn 70% / crit 85%, disk warn 80% / crit 90%.
RAM_WARN, RAM_FAIL = 0.70, 0.85
DISK_WARN, DISK_FAIL = 0.80, 0.90
# Wall-clock skew between a node and cortex: traces and logs stop lining up past these.
SKEW_WARN_S, SKEW_FAIL_S = 2.0, 30.0
DISCOVERY_TIMEOUT_S = 10.0  # discovery runs ibv_devinfo, bounded at 5 s on the node
PROBE_BODY = {"prompt": "hi", "max_tokens": 2, "temperature": 0.0}


@attrs.frozen
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""
    node: str | None = None
    model: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class NodeLive:
    """One node as doctor read it just now; `error` when /health did not answer."""

    name: str
    health: NodeHealth | None = None
    discovery: Discovery | None = None
    error: str | None = None
    discovery_error: str | None = None
    # Node clock minus cortex clock (s), and the round trip that bounds its error.
    skew_s: float | None = None
    rtt_s: float | None = None


@attrs.frozen
class Probe:
    node: str
    model: str
    latency_s: float | None
    error: str | None = None


@attrs.frozen
class Limits:
    """The normal ranges doctor judges by (cortex.toml's doctor_* settings)."""

    # A 2-token probe: warn past slow, fail past critical (the Hydra runbook's 2 s
    # and 5 s), and stop waiting at the timeout ("no answer").
    probe_slow_s: float = 2.0
    probe_critical_s: float = 5.0
    probe_timeout_s: float = 10.0
    restart_window_s: float = 3600.0
    # CPU: the 5-minute load average per core (see cortex/config.py for the why).
    load_warn: float = 1.0
    load_fail: float | None = None
    # Hottest temperature sensor, °C.
    temp_warn_c: float = 80.0
    temp_fail_c: float = 90.0
    # Power at or past this share of the device's own cap warns (it throttles there).
    power_warn_frac: float = 0.95

    @classmethod
    def of(cls, cfg: CortexConfig) -> Limits:
        return cls(
            probe_slow_s=cfg.doctor_probe_slow_s,
            probe_critical_s=cfg.doctor_probe_critical_s,
            probe_timeout_s=cfg.doctor_probe_timeout_s,
            restart_window_s=cfg.doctor_restart_window_s,
            load_warn=cfg.doctor_load_warn,
            load_fail=cfg.doctor_load_fail or None,
            temp_warn_c=cfg.doctor_temp_warn_c,
            temp_fail_c=cfg.doctor_temp_fail_c,
            power_warn_frac=cfg.doctor_power_warn_frac,
        )


def _c(name: str, verdict: Verdict, detail: str, fix: str = "", **kw: Any) -> Check:
    return Check(name=name, verdict=verdict, detail=detail, fix=fix, **kw)


# -- pure checks -------------------------------------------------------------------------


def node_checks(
    live: NodeLive, state: NodeState | None, limits: Limits | None = None
) -> list[Check]:
    n = live.name
    if live.health is None:
        where = "" if state is None else f" at {state.url}"
        return [
            _c(
                "node answering",
                "fail",
                f"{n}{where} does not answer /health: {live.error}",
                f"start the neuron on {n} (systemctl start neuron / launchctl kickstart), "
                "then check the url in cortex.toml and the firewall",
                node=n,
            )
        ]
    h = live.health
    d = live.discovery
    out = [
        _c("node answering", "pass", f"{n} answers (uptime {h.uptime_s:.0f} s)", node=n),
        _node_healthy(n, h, state),
        _discovery(live),
        _skew(live),
    ]
    out.extend(_memory(n, h, d))
    out.extend(_disk(n, h, d))
    out.extend(_rdma(n, d))
    out.extend(_jaccl_budget(n, h, _host(state, n)))
    out.extend(sensor_checks(n, h, limits or Limits()))
    return out


def _node_healthy(n: str, h: NodeHealth, state: NodeState | None) -> Check:
    if state is not None and state.draining:
        why = f"{n} is draining (SIGTERM or a restart): no new requests; those it holds finish"
        return _c("node healthy", "warn", why, "none: it stops or comes back by itself", node=n)
    if state is not None and not state.healthy:
        return _c(
            "node healthy",
            "fail",
            f"cortex counts {n} unhealthy ({state.failures} failed polls: {state.last_error})",
            "wait one poll interval; if it persists, the network between cortex and "
            f"{n} drops requests",
            node=n,
        )
    if h.status == "degraded":
        bad = [
            f"{m.model_id} {m.state}"
            for m in h.models
            if m.state in ("failed", "stalled", "recovering")
        ]
        return _c(
            "node healthy",
            "warn",
            f"{n} is degraded: {', '.join(bad)}",
            "see the model's error in `cortex status`; `cortex unload` then `cortex load` it",
            node=n,
        )
    return _c("node healthy", "pass", f"{n} is {h.status}", node=n)


def _discovery(live: NodeLive) -> Check:
    n, d = live.name, live.discovery
    if d is None or d.memory_total_bytes <= 0 or not d.mlx_version:
        why = live.discovery_error or (
            "MLX not importable" if d is not None and not d.mlx_version else "no memory figure"
        )
        return _c(
            "discovery complete",
            "fail",
            f"{n}: discovery incomplete: {why}",
            f"on {n}: `neuron discover` shows what is missing; reinstall with the neuron extra",
            node=n,
        )
    return _c(
        "discovery complete",
        "pass",
        f"{n}: {d.chip}, {d.memory_total_bytes / 2**30:.0f} GiB, mlx {d.mlx_version} "
        f"({d.mlx_device})",
        node=n,
    )


def _skew(live: NodeLive) -> Check:
    n = live.name
    if live.skew_s is None:
        return _c("clock", "warn", f"{n}: skew unknown", node=n)
    s, rtt = live.skew_s, live.rtt_s or 0.0
    text = f"{n}: {s:+.2f} s from cortex (±{rtt / 2:.2f} s)"
    fix = f"enable NTP on {n} (timedatectl set-ntp true / sntp -sS time.apple.com)"
    if abs(s) - rtt / 2 > SKEW_FAIL_S:
        return _c("clock", "fail", text, fix, node=n)
    if abs(s) - rtt / 2 > SKEW_WARN_S:
        return _c("clock", "warn", text, fix, node=n)
    return _c("clock", "pass", text, node=n)


def _memory(n: str, h: NodeHealth, d: Discovery | None) -> list[Check]:
    if d is None or d.memory_total_bytes <= 0:
        return []
    used = 1 - h.memory_available_bytes / d.memory_total_bytes
    text = (
        f"{n}: {used:.0%} of RAM used ({h.memory_available_bytes / 2**30:.1f} GiB free of "
        f"{d.memory_total_bytes / 2**30:.1f})"
    )
    fix = "unload idle models (`cortex unload MODEL`) or move one to another node"
    if used >= RAM_FAIL:
        return [_c("memory", "fail", text, fix, node=n)]
    if used >= RAM_WARN:
        return [_c("memory", "warn", text, fix, node=n)]
    return [_c("memory", "pass", text, node=n)]


def _disk(n: str, h: NodeHealth, d: Discovery | None) -> list[Check]:
    free = h.disk_free_bytes
    if free is None and d is not None:
        free = d.disk_free_bytes
    total = h.disk_total_bytes or (d.disk_total_bytes if d is not None else 0)
    if free is None:
        return []
    out = []
    purge = "free space: `cortex` POST /admin/store/purge drops unused staged copies"
    if total:
        used = 1 - free / total
        text = f"{n}: disk {used:.0%} used ({free / 1e9:.1f} GB free of {total / 1e9:.1f})"
        verdict: Verdict = "fail" if used >= DISK_FAIL else "warn" if used >= DISK_WARN else "pass"
        out.append(_c("disk", verdict, text, purge if verdict != "pass" else "", node=n))
    floor = h.min_free_bytes
    if floor is not None:
        text = f"{n}: {free / 1e9:.1f} GB free under the store, floor {floor / 1e9:.1f} GB"
        if free < floor:
            out.append(
                _c(
                    "store floor",
                    "fail",
                    text + ": stages are refused",
                    purge + ", or lower min_free_gb in neuron.toml",
                    node=n,
                )
            )
        else:
            out.append(_c("store floor", "pass", text, node=n))
    return out


def _rdma(n: str, d: Discovery | None) -> list[Check]:
    if d is None or not d.rdma_ports:
        return []
    down = [f"{p.device}/{p.port} {p.state}" for p in d.rdma_ports if not p.active]
    if down:
        return [
            _c(
                "rdma ports",
                "fail",
                f"{n}: RDMA port(s) not active: {', '.join(down)}",
                "reseat the Thunderbolt cable; check `ibv_devinfo` on the node; RDMA must be "
                "enabled (rdma_ctl enable in recovery mode on macOS)",
                node=n,
            )
        ]
    return [_c("rdma ports", "pass", f"{n}: {len(d.rdma_ports)} RDMA port(s) active", node=n)]


def _jaccl_budget(n: str, h: NodeHealth, host: str) -> list[Check]:
    budget = h.jaccl_reload_budget
    if budget is None or h.jaccl_loads == 0:
        return []
    text = f"{n}: {h.jaccl_loads} jaccl load(s) since the neuron started (budget {budget})"
    if h.jaccl_loads > budget:
        return [_c("jaccl reload budget", "warn", text, reboot_advice(n, host), node=n)]
    return [_c("jaccl reload budget", "pass", text, node=n)]


def reboot_advice(n: str, host: str | None = None) -> str:
    """Reboot the machine, not the neuron: the queue pairs outlive the process."""
    return (
        f"reboot {n} at a quiet moment, the machine itself: `ssh {host or n} sudo shutdown -r "
        "now`. RDMA queue pairs leak over many jaccl load/unload cycles and only a reboot "
        f"frees them; `cortex restart {n}` recycles the neuron process only (it resets this "
        "count, not the queue pairs)"
    )


def _host(state: NodeState | None, n: str) -> str:
    """The host to ssh to: the one in the node's url, else its name."""
    if state is None:
        return n
    return urlsplit(state.url).hostname or n


# -- sensors (the node's /health `sensors`: neuron.sensors) ------------------------------

# macOS thermal pressure levels, as powermetrics names them: throttling begins past
# Nominal, and from Heavy on the SoC runs well below its clocks.
PRESSURE: dict[str, Verdict] = {"nominal": "pass", "light": "warn", "moderate": "warn"}
# A reading older than this (node clock) is shown with its age: the reader may be stuck.
SENSORS_STALE_S = 60.0


def sensor_checks(n: str, h: NodeHealth, limits: Limits) -> list[Check]:
    """CPU load, temperature and power, each against its normal range (Limits)."""
    s = h.sensors
    if s is None:
        why = "the neuron sends no sensors (an older neuron, or sensors_interval_s = 0)"
        return [
            _c(name, "pass", f"{n}: {name} not reported: {why}", node=n)
            for name in ("cpu load", "temperature", "power")
        ]
    age = h.started_at + h.uptime_s - s.read_at
    stale = f" (read {age:.0f} s ago)" if age > SENSORS_STALE_S else ""
    return [
        attrs.evolve(c, detail=c.detail + stale)
        for c in (_load(n, s, limits), _temperature(n, s, limits), _power(n, s, limits))
    ]


def _not_reported(n: str, name: str, s: Sensors, platform_says: str) -> Check:
    why = "; ".join(s.notes) or platform_says
    return _c(name, "pass", f"{n}: {name} not reported: {why}", node=n)


def _load(n: str, s: Sensors, limits: Limits) -> Check:
    if s.load is None or not s.cpu_count:
        return _not_reported(n, "cpu load", s, "this platform has no load average")
    per_core = s.load[1] / s.cpu_count
    text = (
        f"{n}: load {s.load[0]:.2f} {s.load[1]:.2f} {s.load[2]:.2f} on {s.cpu_count} cores "
        f"({per_core:.2f} a core over 5 min; warn at {limits.load_warn:.1f})"
    )
    fix = (
        f"see what runs on {n} besides the runners (`top`); a saturated node answers "
        "slowly: move work or a model off it"
    )
    if limits.load_fail is not None and per_core >= limits.load_fail:
        return _c("cpu load", "fail", text, fix, node=n)
    if per_core >= limits.load_warn:
        return _c("cpu load", "warn", text, fix, node=n)
    return _c("cpu load", "pass", text, node=n)


def _temperature(n: str, s: Sensors, limits: Limits) -> Check:
    if not s.temperatures_c and s.thermal_pressure is None:
        return _not_reported(n, "temperature", s, "the platform tells none")
    parts: list[str] = []
    verdicts: list[Verdict] = []
    if s.temperatures_c:
        hot = max(s.temperatures_c, key=lambda f: f.value)
        parts.append(
            f"hottest {hot.value:.0f} °C ({hot.source}) of {len(s.temperatures_c)} sensor(s); "
            f"warn {limits.temp_warn_c:g}, fail {limits.temp_fail_c:g}"
        )
        verdicts.append(
            "fail"
            if hot.value >= limits.temp_fail_c
            else "warn"
            if hot.value >= limits.temp_warn_c
            else "pass"
        )
    if s.thermal_pressure is not None:
        parts.append(f"thermal pressure {s.thermal_pressure}")
        verdicts.append(PRESSURE.get(s.thermal_pressure.lower(), "fail"))
    worst = max(verdicts, key=ORDER.__getitem__)
    fix = (
        f"check the airflow and fans at {n}; a hot node throttles and serves slower "
        "(its probe shows it)"
    )
    return _c(
        "temperature", worst, f"{n}: {'; '.join(parts)}", "" if worst == "pass" else fix, node=n
    )


def _power(n: str, s: Sensors, limits: Limits) -> Check:
    if not s.power_w:
        return _not_reported(n, "power", s, "the platform tells none")
    shown = ", ".join(_watts(f) for f in s.power_w[:4])
    more = f" (+{len(s.power_w) - 4} more)" if len(s.power_w) > 4 else ""
    capped = [f for f in s.power_w if f.limit and f.value >= limits.power_warn_frac * f.limit]
    if capped:
        return _c(
            "power",
            "warn",
            f"{n}: at its power cap: {', '.join(_watts(f) for f in capped)}",
            "a device at its cap throttles: expected under full load; idle, look for a "
            "runaway process",
            node=n,
        )
    return _c("power", "pass", f"{n}: {shown}{more}", node=n)


def _watts(f: Figure) -> str:
    cap = f" of {f.limit:.0f} W cap" if f.limit else ""
    return f"{f.source} {f.value:.1f} W{cap}"


def version_checks(lives: Iterable[NodeLive]) -> list[Check]:
    """neuron, MLX and mlx-lm must match across nodes (a group's ranks run one build)."""
    discs = [(lv.name, lv.discovery) for lv in lives if lv.discovery is not None]
    if len(discs) < 1:
        return []
    out = []
    for label, field, verdict in (
        ("neuron", "version", "fail"),
        ("mlx", "mlx_version", "fail"),
        ("mlx-lm", "mlx_lm_version", "fail"),
        ("python", "python_version", "warn"),
    ):
        seen: dict[str, list[str]] = {}
        for name, d in discs:
            seen.setdefault(getattr(d, field) or "?", []).append(name)
        if len(seen) > 1:
            detail = "; ".join(f"{v} on {', '.join(ns)}" for v, ns in sorted(seen.items()))
            out.append(
                _c(
                    f"{label} versions aligned",
                    verdict,  # type: ignore[arg-type]
                    f"{label} differs: {detail}",
                    f"install one {label} version on every node (pip install -U ... then "
                    "restart the neurons)",
                )
            )
        else:
            out.append(
                _c(f"{label} versions aligned", "pass", f"{label} {next(iter(seen))} everywhere")
            )
    return out


def mesh_checks(snap: FleetSnapshot, lives: dict[str, NodeLive]) -> list[Check]:
    """Every member of a jaccl group needs an active RDMA port per peer (a full mesh)."""
    groups: dict[str, list[str]] = {}
    for n in snap.nodes:
        for m in n.models:
            if m.group is not None and m.group.backend == "jaccl" and m.group.world_size > 1:
                groups.setdefault(f"{m.model_id} ({m.group.group_id})", []).append(n.name)
    out = []
    for gname, members in sorted(groups.items()):
        short = []
        for name in members:
            d = lives[name].discovery if name in lives else None
            active = 0 if d is None else sum(p.active for p in d.rdma_ports)
            if active < len(members) - 1:
                short.append(f"{name} has {active} active, needs {len(members) - 1}")
        if short:
            out.append(
                _c(
                    "jaccl mesh",
                    "fail",
                    f"group {gname}: not a full RDMA mesh: {'; '.join(short)}",
                    "cable every pair of members; run `ibv_devinfo` on each",
                    model=gname,
                )
            )
        else:
            out.append(_c("jaccl mesh", "pass", f"group {gname}: full mesh", model=gname))
    return out


def probe_checks(probes: Sequence[Probe], limits: Limits) -> list[Check]:
    out = []
    for p in probes:
        where = f"{p.model} on {p.node}"
        if p.error is not None or p.latency_s is None:
            out.append(
                _c(
                    "model answers",
                    "fail",
                    f"{where}: no answer to a 2-token probe: {p.error}",
                    f"its runner may be wedged: `cortex unload {p.model} --nodes {p.node}` "
                    "then `cortex load`; read the neuron's log for the runner's stderr",
                    node=p.node,
                    model=p.model,
                )
            )
            continue
        text = f"{where}: 2-token probe in {p.latency_s:.2f} s"
        if p.latency_s > limits.probe_critical_s:
            out.append(
                _c(
                    "model answers",
                    "fail",
                    text + f" (critical: over {limits.probe_critical_s:g} s)",
                    "the node is saturated, swapping or throttled: see its queue in "
                    "`cortex status` and its cpu load and temperature here",
                    node=p.node,
                    model=p.model,
                )
            )
        elif p.latency_s > limits.probe_slow_s:
            out.append(
                _c(
                    "model answers",
                    "warn",
                    text + f" (slow: over {limits.probe_slow_s:g} s)",
                    "the node may be swapping or saturated: see its queue in `cortex status`",
                    node=p.node,
                    model=p.model,
                )
            )
        else:
            out.append(_c("model answers", "pass", text, node=p.node, model=p.model))
    return out


def runner_checks(snap: FleetSnapshot, now: float, limits: Limits) -> list[Check]:
    """Runners that failed, are restarting, or restarted within the window."""
    out = []
    for n in snap.nodes:
        for m in n.models:
            where = f"{m.model_id} on {n.name}"
            if m.state == "failed":
                out.append(
                    _c(
                        "runner",
                        "fail",
                        f"{where} failed: {_first(m.error)}",
                        _failed_fix(n, m),
                        node=n.name,
                        model=m.model_id,
                    )
                )
            elif m.state in ("recovering", "stalled") or (
                m.restarted_at is not None and now - m.restarted_at < limits.restart_window_s
            ):
                ago = "" if m.restarted_at is None else f" {now - m.restarted_at:.0f} s ago"
                out.append(
                    _c(
                        "runner restarts",
                        "warn",
                        f"{where}: {m.restarts} restart(s), last{ago}: {_first(m.error)}",
                        "read the runner's stderr in the neuron log; repeated crashes fail it",
                        node=n.name,
                        model=m.model_id,
                    )
                )
    return out


def _failed_fix(n: NodeState, m: NodeModel) -> str:
    # The neuron's rdma_quirk advice opens the error: a reboot, with the command here.
    if "RDMA queue-pair quirk" in (m.error or ""):
        return reboot_advice(n.name, _host(n, n.name)) + f"; then `cortex load {m.model_id}`"
    return f"fix the cause, then `cortex unload {m.model_id}` and `cortex load`"


def _first(text: str | None) -> str:
    return (text or "no reason given").split("\n", 1)[0][:300]


def unserved_checks(unserved: Sequence[dict[str, Any]]) -> list[Check]:
    return [
        _c(
            "model served",
            "fail",
            f"{u['model']}: no working replica: {u['reason']}",
            f"`cortex preview {u['model']}` shows where it fits; `cortex load {u['model']}`",
            model=str(u["model"]),
        )
        for u in unserved
    ]


def verdict(checks: Iterable[Check]) -> Verdict:
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "warn" if "warn" in verdicts else "pass"


def node_advice(state: NodeState) -> list[str]:
    """What the dashboard and /admin/state say about a node besides its figures."""
    h = state.health
    if (
        h is not None
        and h.jaccl_reload_budget is not None
        and h.jaccl_loads > h.jaccl_reload_budget
    ):
        return [reboot_advice(state.name, _host(state, state.name))]
    return []


def node_extras(state: NodeState) -> dict[str, Any]:
    """Fields /admin/state adds to each node for `cortex status` and the dashboard."""
    h, d = state.health, state.discovery
    return {
        "memory_total_bytes": None if d is None else d.memory_total_bytes,
        "disk_free_bytes": (h.disk_free_bytes if h is not None else None)
        or (None if d is None else d.disk_free_bytes),
        "disk_total_bytes": (h.disk_total_bytes if h is not None else None)
        or (None if d is None else d.disk_total_bytes or None),
        "min_free_bytes": None if h is None else h.min_free_bytes,
        "jaccl_loads": 0 if h is None else h.jaccl_loads,
        "jaccl_reload_budget": None if h is None else h.jaccl_reload_budget,
        "advice": node_advice(state),
    }


# -- I/O ---------------------------------------------------------------------------------


async def read_node(
    session: aiohttp.ClientSession, name: str, url: str, timeout_s: float
) -> NodeLive:
    base = url.rstrip("/")
    t0 = time.time()
    try:
        async with session.get(
            base + "/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as r:
            if r.status != 200:
                return NodeLive(name=name, error=f"HTTP {r.status}")
            health = NodeHealth.from_json(await r.json(content_type=None))
        t1 = time.time()
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        return NodeLive(name=name, error=str(exc) or type(exc).__name__)
    skew = (health.started_at + health.uptime_s) - (t0 + t1) / 2
    disc, derr = None, None
    try:
        async with session.get(
            base + "/discovery", timeout=aiohttp.ClientTimeout(total=DISCOVERY_TIMEOUT_S)
        ) as r:
            if r.status != 200:
                derr = f"/discovery answered HTTP {r.status}"
            else:
                disc = Discovery.from_json(await r.json(content_type=None))
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        derr = f"/discovery: {str(exc) or type(exc).__name__}"
    return NodeLive(
        name=name, health=health, discovery=disc, discovery_error=derr, skew_s=skew, rtt_s=t1 - t0
    )


async def probe(
    session: aiohttp.ClientSession, node: str, url: str, model: NodeModel, limits: Limits
) -> Probe:
    t0 = time.monotonic()
    path, body = "/v1/completions", {"model": model.model_id, **PROBE_BODY}
    if model.kind == "embedding":  # an encoder serves embeddings only
        path, body = EMBEDDINGS_PATH, {"model": model.model_id, "input": "hi"}
    try:
        async with session.post(
            url.rstrip("/") + path,
            json=body,
            headers={PROBE_HEADER: "doctor"},
            timeout=aiohttp.ClientTimeout(total=limits.probe_timeout_s),
        ) as r:
            text = await r.text()
            if r.status != 200:
                return Probe(node, model.model_id, None, f"HTTP {r.status}: {text[:200]}")
    except TimeoutError:
        return Probe(node, model.model_id, None, f"no answer within {limits.probe_timeout_s:g} s")
    except aiohttp.ClientError as exc:
        return Probe(node, model.model_id, None, str(exc) or type(exc).__name__)
    return Probe(node, model.model_id, time.monotonic() - t0)


async def run(
    session: aiohttp.ClientSession,
    snap: FleetSnapshot,
    unserved: Sequence[dict[str, Any]],
    limits: Limits,
    poll_timeout_s: float,
) -> list[Check]:
    """Every check, nodes and probes read concurrently (one slow node delays none)."""
    lives_l = await asyncio.gather(
        *(read_node(session, n.name, n.url, poll_timeout_s) for n in snap.nodes)
    )
    lives = {lv.name: lv for lv in lives_l}
    targets = [
        (n, m)
        for n in snap.nodes
        if lives[n.name].health is not None
        for m in n.models
        if m.state == "ready" and m.serves_http
    ]
    probes = await asyncio.gather(*(probe(session, n.name, n.url, m, limits) for n, m in targets))
    checks = [
        _c("cortex reachable", "pass", f"cortex answers; {len(snap.nodes)} node(s) configured")
    ]
    for n in snap.nodes:
        checks.extend(node_checks(lives[n.name], n, limits))
    checks.extend(version_checks(lv for lv in lives_l if lv.health is not None))
    checks.extend(mesh_checks(snap, lives))
    checks.extend(probe_checks(probes, limits))
    checks.extend(runner_checks(snap, time.time(), limits))
    checks.extend(unserved_checks(unserved))
    return checks


def report(checks: Sequence[Check]) -> dict[str, Any]:
    counts = {v: sum(c.verdict == v for c in checks) for v in ORDER}
    return {"verdict": verdict(checks), "counts": counts, "checks": [c.to_json() for c in checks]}
