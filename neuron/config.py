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
    # Heartbeat watchdog: a runner with requests in flight that sends no byte for
    # this long and leaves GET /health unanswered for `health_probe_timeout_s`
    # is killed (a lost peer can make a rank spin or block forever). A streaming
    # runner sends a keepalive during prefill and a frame per token, so 15 s of
    # silence is already far outside normal; the probe guards against false kills.
    stall_timeout_s: float = 15.0
    health_probe_timeout_s: float = 5.0
    # Unload: SIGTERM to the process group, this long, then SIGKILL.
    stop_grace_s: float = 5.0
    # Appended to every runner's command line (e.g. ["--kv-bits", "8"]).
    extra_args: tuple[str, ...] = ()
    # Lines of runner stderr kept in memory for the `failed` error.
    stderr_tail_lines: int = 40
    # A runner whose requests fail this many times in a row (5xx, or a stream cut
    # before its end) is broken: restarted like a crash.
    max_consecutive_errors: int = 3
    # How often GET /health of a ready runner is read (503: its generation thread died).
    health_check_interval_s: float = 5.0
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
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"runner.{name} must be >= 1")
        for name in (
            "warmup_deadline_s",
            "group_connect_deadline_s",
            "stall_timeout_s",
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
