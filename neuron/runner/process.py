"""One runner process: `python -m neuron.runner.main` wrapping `mlx_lm.server`, or
`python -m neuron.runner.embed_main` for an embedding model.

It runs in its own process group (so stop signals reach everything it spawned)
on a free loopback port, holds the read end of a watchdog pipe whose write end
only this neuron holds, and has its output kept twice: a short tail in memory
for error messages and the whole of it in a log file under the store (rotated
by size, and held to a free-space floor: neuron.runner.runner_log).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import attrs

from neuron.config import RunnerConfig
from neuron.runner.main import MODEL_ID_FLAG, PARENT_ENV, SPLIT_ENV, WATCHDOG_ENV
from neuron.runner.model_options import LocalOptions
from neuron.runner.runner_log import RunnerLog
from shared.journal import MB, FileSettings
from shared.kinds import ModelKind
from shared.wire import GroupSpec

log = logging.getLogger(__name__)
# Runner output is read in chunks of this size; a line longer than this (a `\r`
# progress bar never ends one) keeps only its last LINE_LIMIT bytes in the tail.
LINE_LIMIT = 65536
FAST_SYNCH_ENV = "MLX_METAL_FAST_SYNCH"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the runner binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def hostfile_json(group: GroupSpec) -> str:
    """MLX ring hostfile: for every rank in order, the list of its addresses."""
    return json.dumps([[h] for h in group.hosts])


def ibv_devices_json(group: GroupSpec) -> str:
    return json.dumps([list(row) for row in group.ibv_devices])


def group_env(group: GroupSpec | None, files_dir: Path) -> dict[str, str]:
    """Environment of one rank of a runner group; files it names live in `files_dir`.

    Pure: the caller writes `hostfile_json` / `ibv_devices_json` to the paths
    named here (see `write_group_files`).
    """
    if group is None or group.world_size == 1:
        return {}
    env = {"MLX_RANK": str(group.rank), "MLX_WORLD_SIZE": str(group.world_size)}
    if group.backend == "ring":
        env["MLX_HOSTFILE"] = str(files_dir / "hostfile.json")
    else:
        if group.coordinator is None:
            raise ValueError("a jaccl group needs a coordinator")
        env["MLX_JACCL_COORDINATOR"] = group.coordinator
        env["MLX_IBV_DEVICES"] = str(files_dir / "ibv_devices.json")
        # The jaccl cluster's reference sets it on every launch: RDMA collectives
        # measure 5-6x slower without it. A model's catalogue `env` may override it.
        env[FAST_SYNCH_ENV] = "1"
    if group.sharding == "pipeline" and group.layer_split:
        env[SPLIT_ENV] = ",".join(str(n) for n in group.layer_split)
    return env


def runner_env(
    group: GroupSpec | None, files_dir: Path, model_env: dict[str, str] | None = None
) -> dict[str, str]:
    """What the neuron adds to its own environment for a runner: the group's variables,
    then the catalogue's `env` for the model (checked in shared.runner_options: it
    cannot name a group variable, so it only overrides defaults like FAST_SYNCH_ENV),
    then the runner's plumbing. The watchdog fd is added at spawn (spawn_guarded)."""
    return {
        **group_env(group, files_dir),
        **(model_env or {}),
        PARENT_ENV: str(os.getpid()),
        "PYTHONUNBUFFERED": "1",
    }


def write_group_files(group: GroupSpec | None, files_dir: Path) -> None:
    if group is None or group.world_size == 1:
        return
    files_dir.mkdir(parents=True, exist_ok=True)
    if group.backend == "ring":
        (files_dir / "hostfile.json").write_text(hostfile_json(group))
    else:
        (files_dir / "ibv_devices.json").write_text(ibv_devices_json(group))


def _argv_head(
    config: RunnerConfig, module: str, model_id: str, model_dir: Path, port: int
) -> list[str]:
    """What every runner's command line starts with: its shim, model and loopback port."""
    return [
        config.python,
        "-m",
        module,
        MODEL_ID_FLAG,
        model_id,
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def embed_runner_argv(
    config: RunnerConfig, model_id: str, model_dir: Path, port: int, max_input_tokens: int | None
) -> list[str]:
    """The embedding runner's command line (an encoder: no mlx_lm.server arguments)."""
    argv = [
        *_argv_head(config, "neuron.runner.embed_main", model_id, model_dir, port),
        "--max-batch-tokens",
        str(config.embed_batch_tokens),
    ]
    if max_input_tokens is not None:
        argv += ["--max-input-tokens", str(max_input_tokens)]
    return argv


def runner_argv(
    config: RunnerConfig,
    model_id: str,
    model_dir: Path,
    port: int,
    group: GroupSpec | None,
    options: LocalOptions | None = None,
) -> list[str]:
    """mlx_lm.server's command line: the neuron's runner settings, then the model's own
    options from the catalogue (argparse keeps the last of a repeated flag)."""
    local = options if options is not None else LocalOptions()
    argv = [
        *_argv_head(config, "neuron.runner.main", model_id, model_dir, port),
        "--decode-concurrency",
        str(config.decode_concurrency),
        "--prompt-concurrency",
        str(config.prompt_concurrency),
        "--prompt-cache-size",
        str(config.prompt_cache_size),
        "--prefill-step-size",
        str(config.prefill_step_size),
        "--max-tokens",
        str(local.options.max_tokens or config.max_tokens),
        "--log-level",
        "WARNING",
    ]
    if group is not None and group.sharding == "pipeline" and group.world_size > 1:
        argv.append("--pipeline")
    return [*argv, *config.extra_args, *local.flags()]


async def spawn_guarded(
    argv: list[str], env: dict[str, str], *, stderr: int
) -> tuple[asyncio.subprocess.Process, int]:
    """Start a child that dies with this neuron (runner_main's guards): its own session,
    and the read end of a watchdog pipe whose write end (returned) we hold."""
    read_fd, write_fd = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env={**env, WATCHDOG_ENV: str(read_fd)},
            pass_fds=(read_fd,),
            start_new_session=True,
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return process, write_fd


@attrs.define(eq=False)
class RunnerProcess:
    """A started runner; `exited` resolves with its return code when it dies."""

    model_id: str
    port: int
    process: asyncio.subprocess.Process
    # The runner's output file (store/logs/<model>.log), rotated and floored.
    log: RunnerLog
    started_at: float
    exited: asyncio.Future[int]
    _tail: collections.deque[str]
    _watchdog_w: int | None
    # What the neuron set beyond its inherited environment (runner_env): for the event log.
    env_added: dict[str, str] = attrs.field(factory=dict)
    _pump: asyncio.Task[None] | None = None
    _waiter: asyncio.Task[None] | None = None
    # Whether the pump is writing the log (`note()` writes only then), and whether
    # the log's last byte ended a line.
    _pumping: bool = False
    _line_start: bool = True
    _env_text: str | None = None

    @classmethod
    async def start(
        cls,
        config: RunnerConfig,
        *,
        model_id: str,
        model_dir: Path,
        log_dir: Path,
        group: GroupSpec | None = None,
        kind: ModelKind = "chat",
        context_limit: int | None = None,
        options: LocalOptions | None = None,
        log_min_free_bytes: int = 0,
    ) -> RunnerProcess:
        """Start the runner `kind` needs: mlx_lm.server (chat) or the embedding runner;
        `context_limit` bounds an embedding model's tokens per input; `options` are
        the catalogue's for this model (a chat model's only). Its log is only counted
        while the disk has less than `log_min_free_bytes` free."""
        port = free_port()
        group_dir = log_dir / f"{_safe(model_id)}.group"
        await asyncio.to_thread(_prepare_dirs, log_dir, group, group_dir)
        added = runner_env(group, group_dir, options.options.env if options else None)
        env = {**os.environ, **added}
        argv = (
            embed_runner_argv(config, model_id, model_dir, port, context_limit)
            if kind == "embedding"
            else runner_argv(config, model_id, model_dir, port, group, options)
        )
        process, write_fd = await spawn_guarded(
            argv,
            env,
            stderr=asyncio.subprocess.STDOUT,
        )
        loop = asyncio.get_running_loop()
        runner = cls(
            model_id=model_id,
            port=port,
            process=process,
            log=RunnerLog(
                FileSettings(
                    path=log_dir / f"{_safe(model_id)}.log",
                    max_bytes=max(1, int(config.log_max_mb * MB)),
                    keep=config.log_keep,
                    min_free_bytes=max(0, log_min_free_bytes),
                )
            ),
            started_at=time.time(),
            exited=loop.create_future(),
            tail=collections.deque(maxlen=config.stderr_tail_lines),
            watchdog_w=write_fd,
            env_added=added,
        )
        runner._pump = asyncio.create_task(runner._read_output())
        runner._waiter = asyncio.create_task(runner._wait_exit())
        return runner

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.log.path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def env_shown(self) -> str:
        """The environment the neuron set for this runner, as the event log and traces
        show it ("which settings did this run with"): a value whose name looks secret
        (a catalogue `env` may hold a hub token) is never shown. Built once: every
        request's trace carries it."""
        if self._env_text is None:
            self._env_text = " ".join(
                f"{k}=***" if _SECRET_NAME.search(k) else f"{k}={v}"
                for k, v in sorted(self.env_added.items())
            )
        return self._env_text

    def tail(self) -> str:
        return "\n".join(self._tail)

    def stopped(self) -> bool:
        """Is the process stopped (SIGSTOP, a debugger's trace stop)?  False where
        /proc cannot tell (macOS): the /health probe covers those."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_bytes()
        except OSError:
            return False
        # "pid (comm) state ...": comm may hold spaces and parentheses.
        fields = stat.rpartition(b")")[2].split()
        return bool(fields) and fields[0] in (b"T", b"t")

    def note(self, text: str) -> None:
        """A line of ours in the runner's log (a request id as its call starts), so a
        line of runner output can be matched with a trace."""
        if not self._pumping:
            return
        self.log.write(("" if self._line_start else "\n").encode() + f"--- {text}\n".encode())
        self._line_start = True

    async def _read_output(self) -> None:
        """Drain the runner's output into the log file and the tail, to its end.

        Chunks, not `readline()`: a line over the stream's limit would raise and
        leave the pipe undrained, and a runner blocks once its pipe is full.
        """
        stream = self.process.stdout
        assert stream is not None
        out = self.log  # its writes never raise: a full disk must not stop the draining
        out.write(f"--- runner start pid={self.pid} port={self.port}\n".encode())
        self._pumping = True
        partial = b""  # the unfinished last line
        try:
            while chunk := await stream.read(LINE_LIMIT):
                out.write(chunk)
                self._line_start = chunk.endswith(b"\n")
                *lines, partial = (partial + chunk).split(b"\n")
                partial = partial[-LINE_LIMIT:]
                self._tail.extend(_text(line) for line in lines)
            if partial:
                self._tail.append(_text(partial))
        finally:
            self._pumping = False
            out.close()

    async def _wait_exit(self) -> None:
        code = await self.process.wait()
        self._close_watchdog()
        self._tail.append(f"[runner exited with code {code}]")
        if not self.exited.done():
            self.exited.set_result(code)

    def _close_watchdog(self) -> None:
        if self._watchdog_w is not None:
            with contextlib.suppress(OSError):
                os.close(self._watchdog_w)
            self._watchdog_w = None

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM the whole group, wait up to `grace_s`, then SIGKILL it."""
        if self.alive:
            self._signal_group(signal.SIGTERM)
            # A stopped runner (SIGSTOP, a frozen rank) acts on SIGTERM only once continued.
            self._signal_group(signal.SIGCONT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), grace_s)
        # SIGKILL even after a clean exit: children of the runner may linger.
        self._signal_group(signal.SIGKILL)
        code = await asyncio.shield(self.exited)
        pump = self._pump
        if pump is not None:
            # Let it take the last output; its failure is no reason to fail the stop.
            await asyncio.wait({pump}, timeout=2.0)
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                log.warning("output reader of runner %d failed: %r", self.pid, pump.exception())
        return code

    def kill_now(self) -> None:
        """SIGKILL the whole group at once, no grace: a crashed, stalled or failed runner.

        Synchronous; the exit is noticed (and reaped) by `exited` as usual.
        """
        self._signal_group(signal.SIGKILL)
        self._close_watchdog()


_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASS|AUTH|CREDENTIAL", re.IGNORECASE)


def _prepare_dirs(log_dir: Path, group: GroupSpec | None, group_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    write_group_files(group, group_dir)


def _text(line: bytes) -> str:
    return line.decode(errors="replace").rstrip()


def _safe(model_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
