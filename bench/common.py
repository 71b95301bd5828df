"""What the benches share: child processes and their CPU, scratch dirs, ports, and one
streamed chat request timed to its first token."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from shared.blocking_http import request_json
from shared.wire import ModelHealth

# mlx_lm.server serves its own model under this name (see neuron.http.proxy).
RUNNER_MODEL_NAME = "default_model"


def console_script(name: str) -> str:
    """The console script installed next to this interpreter."""
    return str(Path(sys.executable).parent / name)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A scratch dir with logs/ (world-readable: nginx's workers read canned answers
    there), removed afterwards unless `keep`."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    (root / "logs").mkdir()
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def idle_health(model_id: str) -> dict[str, Any]:
    """A ready, idle model as a neuron's /health lists it (the wire record's JSON)."""
    return ModelHealth(
        model_id=model_id,
        state="ready",
        in_flight=0,
        queue_depth=0,
        phase="idle",
        decode_tps=None,
        ttft_s=None,
        last_used=0.0,
    ).to_json()


REPO = Path(__file__).resolve().parent.parent


@attrs.define
class Procs:
    """Child processes, each in its own session, stopped in reverse start order."""

    root: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = attrs.Factory(list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        # Children run in the scratch dir: `-m bench.x` must still find this checkout
        # (bench/ is not an installed package).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            argv,
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        dead = [name for name, p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited early; see {self.root}/logs/")

    def stop(self, grace_s: float = 15.0) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # The runner lives in its own process group under the neuron; should the
        # neuron not have stopped it, kill anything still running from our temp dir.
        for pid in pids_mentioning(str(self.root)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def pids_mentioning(text: str) -> list[int]:
    """Our own leftovers: processes whose command line names our unique temp dir."""
    out = []
    me = os.getpid()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(entry.name))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads) so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def wait_http(url: str, procs: Procs, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(OSError):
            status, _, _ = request_json("GET", url, timeout=2.0)
            if status < 500:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f}s")


@attrs.frozen
class Target:
    name: str
    base_url: str
    model: str


@attrs.frozen
class Sample:
    ok: bool
    ttft_s: float
    total_s: float
    tokens: int
    error: str = ""


async def one_request(
    session: aiohttp.ClientSession, t: Target, text: str, max_tokens: int
) -> Sample:
    body = {
        "model": t.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    buf = b""
    try:
        async with session.post(f"{t.base_url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                text_ = (await resp.read())[:200].decode(errors="replace")
                return Sample(False, 0.0, time.perf_counter() - start, 0, f"{resp.status} {text_}")
            async for chunk in resp.content.iter_any():
                buf = (buf + chunk).replace(b"\r\n", b"\n")
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if not ev.startswith(b"data:"):
                        continue  # neuron keepalive comments are not tokens
                    data = ev[5:].strip()
                    if data == b"[DONE]":
                        continue
                    if _has_content(data):
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        tokens += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(False, 0.0, time.perf_counter() - start, tokens, repr(exc))
    total = time.perf_counter() - start
    return Sample(True, ttft if ttft is not None else total, total, tokens)


def _has_content(data: bytes) -> bool:
    try:
        frame = json.loads(data)
    except ValueError:
        return False
    for choice in frame.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return True
    return False


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out
