"""`cortex.toml`: where cortex listens, which neurons it manages, and its limits.

Strict like every config here: an unknown key or a wrong type names the key
and the file. Relative paths (the catalogue) are taken from the file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs
from aiohttp import web

from shared.catalogue import Catalogue
from shared.config import ServerConfig, load_config, read_token


@attrs.frozen
class NeuronRef:
    """One neuron cortex polls and routes to."""

    name: str
    url: str

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise ValueError("a neuron needs a name")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"neuron {self.name!r}: url must start with http:// or https://")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


@attrs.frozen
class ApiKey:
    """A client key and the models it may use (ids or aliases; "*" for all)."""

    key: str = attrs.field(repr=False)
    models: tuple[str, ...] = ("*",)
    # A label for logs and metrics; never the key itself.
    name: str = ""

    def __attrs_post_init__(self) -> None:
        if len(self.key) < 8:
            raise ValueError("an api key must be at least 8 characters")

    @property
    def label(self) -> str:
        return self.name or f"{self.key[:4]}…"


@attrs.frozen
class CortexConfig(ServerConfig):
    """Cortex's settings; the ones a neuron shares (listening, drain, fleet token,
    journals) are ServerConfig's."""

    port: int = 9400
    catalogue: str = "models.toml"
    # Reload cortex.toml and the catalogue when either changes on disk (as SIGHUP does).
    watch_config: bool = False
    neurons: tuple[NeuronRef, ...] = ()
    # Poll neurons that announce themselves over mDNS (DNS-SD `_cortex-neuron._tcp`)
    # besides [[neurons]] (which win a conflict). One is polled only once it proves it
    # holds this cortex's fleet token; one that cannot is listed as a `stranger`. A
    # discovered node unheard from for `discover_forget_s` leaves the poll set.
    discover: bool = False
    discover_forget_s: float = 60.0
    # `cortex join-code`: how long a code stays good (single use; `--ttl` shortens it).
    join_code_ttl_s: float = 600.0
    # Health polling: every node concurrently, each call with its own timeout.
    poll_interval_s: float = 2.0
    poll_timeout_s: float = 1.5
    failure_threshold: int = 3
    # Poll requests in flight at once (and the poller's connection pool size); more
    # nodes wait their turn, each call's timeout starting once it has its slot.
    poll_concurrency: int = 128
    # How a ready replica is chosen: "affinity" (least loaded, but a conversation
    # goes back to the replica whose prompt cache holds its prefix), "least_loaded"
    # (no affinity), or "round_robin" (replicas in turn, load ignored: a baseline).
    routing: Literal["affinity", "least_loaded", "round_robin"] = "affinity"
    # Proxy: time to get a connection, and the longest a stream may stay silent
    # once it has begun: a few of the neurons' heartbeats (a `: keepalive` every
    # heartbeat_s = 1 s while busy), so a stalled node costs a client seconds.
    connect_timeout_s: float = 3.0
    idle_read_timeout_s: float = 5.0
    # The longest wait for a neuron's answer headers (it sends them once it admits
    # a request; unstreamed, with the whole answer). A node that stops answering is
    # not waited for this long: polls mark it down and its attempts end at once.
    response_timeout_s: float = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    # Attempts on distinct replicas for a request that failed before its first byte.
    retry_attempts: int = 3
    # Prefix affinity: stay on the remembered replica unless its load exceeds the
    # least-loaded replica's by more than this many requests. 8, a neuron's default
    # in-flight cap: below it the replica still serves at once, which beats
    # prefilling the whole conversation again elsewhere (bench.affinity: at 4, a
    # burst of 8 conversations over 2 replicas lost a third of its cache hits).
    affinity_margin: int = 8
    affinity_entries: int = 8192
    api_keys: tuple[ApiKey, ...] = ()
    admin_token: str | None = attrs.field(default=None, repr=False)
    # How long a request for a model being loaded waits for it (most clients time
    # out far later) before it is told 503 model_loading.
    load_wait_s: float = 60.0
    # A cold load (neuron's download + start + warmup) that takes longer fails.
    load_deadline_s: float = 900.0
    load_poll_interval_s: float = 0.25
    # An explicit load waits this long for a node's discovery before answering 503.
    discovery_wait_s: float = 5.0
    # Ring groups' TCP ports: each group takes a block of consecutive ports (rank i on
    # the block's first + i), blocks taken in turn through ring_base_port .. +
    # ring_port_span - 1. Below 32768: outside Linux's (32768-60999) and macOS's
    # (49152-65535) ephemeral ranges, where any outgoing connection may take a port.
    ring_base_port: int = 28000
    ring_port_span: int = 4000
    # A node restarted by an operator (POST /admin/nodes/{name}/restart) is kept out of
    # routing until it answers as a new process, or at most this long.
    recycle_timeout_s: float = 600.0
    # -- a model's life (cortex.run.lifecycle) --
    # Requests that may wait for one model's load at once; beyond, 503 at once.
    max_waiting: int = 256
    # A failed load: no new one before 1, 2, 4 ... 60 times this (x6 when it
    # needs an operator, at most 600 s); requests meanwhile get 503 cold_load_failed.
    load_backoff_s: float = 5.0
    # Unload a model idle this long (a catalogue entry's idle_ttl_s wins); None: never.
    idle_ttl_s: float | None = None
    # The longest a request's keep_alive may keep a model (a negative one means this).
    max_keep_alive_s: float = 24 * 3600.0
    # One unload POST (teardowns, idle unloads): a hung node must not stall the others.
    unload_timeout_s: float = 10.0
    # -- doctor (GET /admin/doctor, `cortex doctor`) --
    # A replica's 2-token probe: slower than slow warns, slower than critical fails (the
    # Hydra runbook's 2 s and 5 s); none within the timeout fails as "no answer".
    doctor_probe_slow_s: float = 2.0
    doctor_probe_critical_s: float = 5.0
    doctor_probe_timeout_s: float = 10.0
    # A node's 5-minute load average per core: past 1.0 runnable threads wait for a
    # core (the usual saturation line). No fail line by default: a node doing CPU
    # work is busy, not broken, and the probe's latency fails it once it is too slow
    # to serve; set one (> 0) to fail past it.
    doctor_load_warn: float = 1.0
    doctor_load_fail: float = 0.0
    # The hottest temperature sensor (°C): CPUs and GPUs throttle from about 90-100
    # (Intel TjMax 100, AMD Tctl 95, NVIDIA's slowdown near 90), so 80 leaves a margin
    # and 90 is at the throttle line. macOS reports a pressure level instead.
    doctor_temp_warn_c: float = 80.0
    doctor_temp_fail_c: float = 90.0
    # Power at or past this share of a device's own cap (NVIDIA power.limit, hwmon
    # power*_cap) warns: it throttles there. Never a fail: under full load it is normal.
    doctor_power_warn_frac: float = 0.95
    # A runner restart this recent is reported (warn).
    doctor_restart_window_s: float = 3600.0
    # -- the dashboard's charts (cortex.run.history): a point every step, kept this long --
    history_step_s: float = 5.0
    history_span_s: float = 600.0
    # -- what cortex keeps across restarts --
    # Operators' holds (a forced unload) as JSON. In a file read with `from_file`,
    # unset means `cortex-state.json` in journal_dir if set, else beside this file;
    # None (a config built in code): memory only.
    state_file: str | None = None

    def __attrs_post_init__(self) -> None:
        self.check_server()
        self._check_unique()
        self._check_polling()
        self._check_limits()
        for name in (
            "load_backoff_s",
            "max_keep_alive_s",
            "unload_timeout_s",
            "doctor_probe_slow_s",
            "doctor_probe_critical_s",
            "doctor_probe_timeout_s",
            "doctor_load_warn",
            "doctor_temp_warn_c",
            "doctor_temp_fail_c",
            "doctor_power_warn_frac",
            "doctor_restart_window_s",
            "discover_forget_s",
            "join_code_ttl_s",
            "history_step_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    def _check_unique(self) -> None:
        names = [n.name for n in self.neurons]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"neuron name {sorted(dup)[0]!r} used twice")
        keys = [k.key for k in self.api_keys]
        if len(keys) != len(set(keys)):
            raise ValueError("an api key is listed twice")

    def _check_polling(self) -> None:
        for name in ("poll_interval_s", "poll_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("response_timeout_s", "load_poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.poll_concurrency < 1:
            raise ValueError("poll_concurrency must be >= 1")
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")

    def _check_limits(self) -> None:
        if self.retry_attempts < 1:
            raise ValueError("retry_attempts must be >= 1")
        if self.load_wait_s < 0 or self.discovery_wait_s < 0:
            raise ValueError("load_wait_s and discovery_wait_s must be >= 0")
        # Ring ports come from base .. base + span - 1 (lifecycle.RingPorts), a block a group.
        last = self.ring_base_port + self.ring_port_span - 1
        if self.ring_port_span < 2 or not 1024 <= self.ring_base_port <= last <= 65535:
            raise ValueError(
                "ring ports ring_base_port .. ring_base_port + ring_port_span - 1"
                f" ({self.ring_base_port}..{last}) must lie within 1024..65535,"
                " with ring_port_span >= 2"
            )
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise ValueError("admin_token must be at least 8 characters")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if self.doctor_load_fail < 0:
            raise ValueError("doctor_load_fail must be >= 0 (0: load never fails)")
        step = self.history_step_s
        if step > 0 and not 1 <= self.history_span_s / step <= 10_000:
            raise ValueError("history_span_s / history_step_s must be 1 .. 10000 points")

    @classmethod
    def from_file(cls, path: str | Path) -> CortexConfig:
        """Read a `cortex.toml`; the catalogue path is taken from the file's folder."""
        cfg = load_config(cls, path)
        base = Path(path).resolve().parent
        cat = Path(cfg.catalogue).expanduser()
        if not cat.is_absolute():
            cat = base / cat
        token = read_token(
            file=cfg.fleet_token_file, env=cfg.fleet_token_env, base=base, config=str(path)
        )
        journal = None if cfg.journal_dir is None else str(base / cfg.journal_dir)
        if cfg.state_file is not None:
            state = base / Path(cfg.state_file).expanduser()
        else:
            state = Path(journal or base) / "cortex-state.json"
        return attrs.evolve(
            cfg, catalogue=str(cat), fleet_token=token, journal_dir=journal, state_file=str(state)
        )


def catalogue_problems(config: CortexConfig, catalogue: Catalogue) -> list[str]:
    """What would make a load fail for sure: a local source missing, an unknown pinned node.

    (A local source is checked on this host; a neuron elsewhere may see other files.)
    """
    names = {n.name for n in config.neurons}
    out = []
    for spec in catalogue.models:
        if spec.is_local:
            path = Path(spec.source).expanduser()
            if not path.exists():
                out.append(f"model {spec.id!r}: local source {str(path)!r} does not exist")
            elif not (path / "config.json").is_file():
                out.append(f"model {spec.id!r}: {str(path)!r} is not a model dir (no config.json)")
        out += spec.option_problems()  # its draft model and adapters (shared.catalogue)
        unknown = sorted(set(spec.pinned_on) - names)
        # With discovery a pin may name a node no [[neurons]] lists: it announces itself.
        if unknown and not config.discover:
            out.append(
                f"model {spec.id!r}: pinned_on names node(s) not configured: {', '.join(unknown)}"
            )
    return out


# Where the app keeps its settings.
CONFIG = web.AppKey("config", CortexConfig)
# ... and the catalogue (models.toml) it names.
CATALOGUE = web.AppKey("catalogue", Catalogue)
