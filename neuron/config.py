"""`neuron.toml`: what a neuron listens on, where it keeps models, how it runs them.

Loaded strictly (shared.config): an unknown or mistyped key is an error naming
the key and the file.  Every table is optional; the defaults run a neuron on
127.0.0.1:9410 with its store under ~/.neuron.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs

from shared.config import ServerConfig, load_config, read_token
from shared.kinds import ModelKind
from shared.model_id import check as check_model_id


@attrs.frozen
class RunnerConfig:
    """How each `mlx_lm.server` runner is started."""

    # Interpreter that runs `-m neuron.runner.main`; must have mlx and mlx-lm.
    python: str = sys.executable
    decode_concurrency: int = 8
    prompt_concurrency: int = 4
    prompt_cache_size: int = 4
    # Prompt tokens prefilled per step. The runner notices a client that left only
    # between steps (its keepalive write fails), so smaller steps stop abandoned
    # prefill sooner at a small cost in prefill speed (mlx_lm's default is 2048).
    prefill_step_size: int = 512
    # Default generation cap when a request names none.
    max_tokens: int = 512
    # Start to first answered 1-token request; a runner that misses it is killed.
    warmup_deadline_s: float = 300.0
    # The same for a multi-rank group (rank 0 answers only once every rank joined).
    group_connect_deadline_s: float = 120.0
    # The heartbeat: every `health_check_interval_s` each runner, idle or busy, is
    # looked at (its process stopped?) and, if it serves HTTP, asked GET /health
    # (answered on its HTTP thread: no generation slot is taken). A runner whose
    # process is stopped, or whose /health goes unanswered for
    # `health_probe_timeout_s`, is `stalled` at once (not routable); still stalled
    # `stall_timeout_s` later, it is killed and replaced (a rank of a group: the
    # group is torn down and re-formed).
    stall_timeout_s: float = 2.5
    health_probe_timeout_s: float = 2.0
    # Rank 0 of a multi-rank group with requests in flight and no byte from its
    # runner for this long is hung on a collective (a lost or frozen peer: its
    # /health still answers, and MLX's ring spins, so its CPU time says nothing).
    # The runner is always asked to stream, and streams a keepalive per prefill
    # step and a frame per token, so this much silence is far outside normal.
    group_stall_timeout_s: float = 8.0
    # Unload: SIGTERM to the process group, this long, then SIGKILL.
    stop_grace_s: float = 5.0
    # Appended to every runner's command line (e.g. ["--kv-bits", "8"]).
    extra_args: tuple[str, ...] = ()
    # Lines of runner stderr kept in memory for the `failed` error.
    stderr_tail_lines: int = 40
    # Each runner's whole output, store/logs/<model>.log, is rotated (`.1`, `.2` ...)
    # past log_max_mb keeping log_keep old files, as the journals are; below the
    # journals' free-space floor (journal_min_free_mb) it is only counted.
    log_max_mb: float = 64.0
    log_keep: int = 3
    # A runner whose requests fail this many times in a row (5xx, or a stream cut
    # before its end) is broken: restarted like a crash.
    max_consecutive_errors: int = 3
    # The heartbeat's period (above); a 503 from /health means its generation thread died.
    health_check_interval_s: float = 1.0
    # Embedding runners: tokens (padded) computed in one batch, across the requests
    # that queued while the previous batch ran.
    embed_batch_tokens: int = 8192

    def __attrs_post_init__(self) -> None:
        for name in (
            "decode_concurrency",
            "prompt_concurrency",
            "prompt_cache_size",
            "prefill_step_size",
            "max_tokens",
            "max_consecutive_errors",
            "embed_batch_tokens",
            "log_keep",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"runner.{name} must be >= 1")
        if self.log_max_mb <= 0:
            raise ValueError("runner.log_max_mb must be > 0")
        for name in (
            "warmup_deadline_s",
            "group_connect_deadline_s",
            "stall_timeout_s",
            "group_stall_timeout_s",
            "health_probe_timeout_s",
            "health_check_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"runner.{name} must be > 0")


@attrs.frozen
class AdmissionConfig:
    """Per model: requests running at once, waiting, and how long one may wait."""

    max_in_flight: int = 8
    max_queue: int = 32
    queue_timeout_s: float = 30.0

    def __attrs_post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("admission.max_in_flight must be >= 1")
        if self.max_queue < 0:
            raise ValueError("admission.max_queue must be >= 0")
        if self.queue_timeout_s <= 0:
            raise ValueError("admission.queue_timeout_s must be > 0")


@attrs.frozen
class RestartConfig:
    """A runner that crashes `max_crashes` times within `crash_window_s` stays failed."""

    max_crashes: int = 3
    crash_window_s: float = 300.0

    def __attrs_post_init__(self) -> None:
        if self.max_crashes < 1:
            raise ValueError("restart.max_crashes must be >= 1")


@attrs.frozen
class LoadEntry:
    """A model loaded when the neuron starts."""

    model_id: str
    source: str
    # "chat" (mlx_lm.server) or "embedding" (the embedding runner).
    kind: ModelKind = "chat"

    def __attrs_post_init__(self) -> None:
        check_model_id(self.model_id, "[[load]] model_id")  # as a load request's (shared.wire)


@attrs.frozen
class NeuronConfig(ServerConfig):
    """A neuron's settings; the ones cortex shares (listening, drain, fleet token,
    journals) are ServerConfig's."""

    port: int = 9410
    store_dir: str = "~/.neuron"
    node_name: str | None = None
    # Address peers use to reach this node's ranks over TCP (ring backend).
    ring_host: str = "127.0.0.1"
    # The longest a runner may stay silent mid-stream; never a total timeout. A
    # non-streamed answer comes only at its end, so it has none: runner exit and
    # the stall watchdog end those.
    idle_read_timeout_s: float = 300.0
    # SSE comment sent to the client while the runner is silent (long prefill).
    heartbeat_s: float = 1.0
    max_body_bytes: int = 16 * 1024 * 1024
    # Failed models stay listed (with their error) this long, and at most this many.
    failed_record_ttl_s: float = 600.0
    max_failed_records: int = 16
    # Directories local model sources may live in, besides the store (a load of
    # any other path is refused: the API must not open paths of a caller's choosing).
    model_roots: tuple[str, ...] = ()
    # Staged copies no runner uses are kept, most recently used first, up to this
    # many GB (1e9 bytes); beyond it the least recently used are deleted when a
    # runner stops, at startup, and on POST /store/purge-staging.
    staging_keep_recent_gb: float = 40.0
    # A stage that would leave less than this free under the store is refused
    # (507 insufficient_storage, with the arithmetic) before it writes a byte.
    min_free_gb: float = 5.0
    # A stage's source (peer or hub) silent this long is given up for the next one.
    stage_read_timeout_s: float = 30.0
    # The model hub's base URL (a mirror); None: huggingface_hub's (HF_ENDPOINT).
    hub_endpoint: str | None = None
    # Loads of jaccl-group ranks since the neuron started past which doctor and the
    # dashboard advise a reboot (RDMA queue pairs degrade over many load cycles).
    jaccl_reload_budget: int = 20
    # Announce this node over mDNS (DNS-SD `_cortex-neuron._tcp`) while `neuron serve`
    # runs, for a cortex with `discover = true`. On by default: it is what makes a
    # node join without a config edit, it carries no secret, and it takes effect only
    # once `host` is beyond loopback (no other host could reach a loopback neuron).
    announce: bool = True
    # CPU load, temperatures and power for /health and `cortex doctor` (neuron.sensors):
    # read every sensors_interval_s on a thread of their own (0: not read). The hwmon
    # root is Linux's; sensors_powermetrics_sudo runs macOS's powermetrics (root only)
    # as `sudo -n powermetrics`, for a neuron user a sudoers rule allows it.
    sensors_interval_s: float = 10.0
    sensors_hwmon_dir: str = "/sys/class/hwmon"
    sensors_powermetrics_sudo: bool = False
    # POST /admin/reboot (cortex: `cortex reboot NODE --confirm NODE`) reboots this
    # machine with reboot_command, for RDMA queue pairs only a reboot frees. Off by
    # default; on, it needs a fleet token, and the neuron's user the right to run it
    # (a sudoers rule for the command, or root). The minute lets the answer and the
    # drain happen first.
    allow_reboot: bool = False
    reboot_command: tuple[str, ...] = ("sudo", "-n", "/sbin/shutdown", "-r", "+1")
    runner: RunnerConfig = attrs.Factory(RunnerConfig)
    admission: AdmissionConfig = attrs.Factory(AdmissionConfig)
    restart: RestartConfig = attrs.Factory(RestartConfig)
    load: tuple[LoadEntry, ...] = ()

    def __attrs_post_init__(self) -> None:
        self.check_server()
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        if self.failed_record_ttl_s <= 0 or self.max_failed_records < 0:
            raise ValueError("failed_record_ttl_s must be > 0, max_failed_records >= 0")
        if self.staging_keep_recent_gb < 0 or self.min_free_gb < 0:
            raise ValueError("staging_keep_recent_gb and min_free_gb must be >= 0")
        if self.stage_read_timeout_s <= 0:
            raise ValueError("stage_read_timeout_s must be > 0")
        if self.jaccl_reload_budget < 1:
            raise ValueError("jaccl_reload_budget must be >= 1")
        if not self.reboot_command:
            raise ValueError("reboot_command must name a command")
        if self.sensors_interval_s < 0:
            raise ValueError("sensors_interval_s must be >= 0 (0: sensors not read)")
        ids = [e.model_id for e in self.load]
        if len(ids) != len(set(ids)):
            raise ValueError("[[load]] names a model_id twice")

    @property
    def store_path(self) -> Path:
        return Path(self.store_dir).expanduser()

    @classmethod
    def from_file(cls, path: str | Path) -> NeuronConfig:
        """Read a `neuron.toml`; relative paths in it are taken from the file's folder."""
        cfg = load_config(cls, path)
        base = Path(path).resolve().parent
        token = read_token(
            file=cfg.fleet_token_file, env=cfg.fleet_token_env, base=base, config=str(path)
        )
        roots = tuple(str(base / Path(r).expanduser()) for r in cfg.model_roots)
        store = Path(cfg.store_dir).expanduser()
        loads = tuple(
            attrs.evolve(e, source=str((base / e.source).resolve()))
            if e.source.startswith(".")
            else e
            for e in cfg.load
        )
        return attrs.evolve(
            cfg,
            store_dir=str(store if store.is_absolute() else base / store),
            load=loads,
            model_roots=roots,
            fleet_token=token,
            journal_dir=None if cfg.journal_dir is None else str(base / cfg.journal_dir),
        )
