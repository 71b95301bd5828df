"""Hostile clients against cortex and a neuron: gzip bombs and slowloris (issue 19).

    python -m bench.hostile                       # this checkout
    python -m bench.hostile --src /tmp/before     # another tree, e.g. the commit before:
                                                  # git worktree add /tmp/before HEAD~

For each service (its defaults, no model loaded: the body is refused before any
routing) it prints:

  bombs      /health latency (a fresh connection every 20 ms) and the service's RSS
             while 1, 4 and 8 clients at once each upload a 1 MB gzip body that
             inflates to 1 GiB; the answers they got
  slowloris  N connections (2,000) from 8 loopback addresses (under the default cap
             of 1,024 per address), each sending its headers at 1 byte/s: how many
             are still open 2 s after the header timeout and at the end of the
             watch (45 s), and /health latency meanwhile (from 127.0.0.1)

Nothing here is an assertion; tests/e2e/test_hostile_clients.py bounds the same
things generously. The clients are also what those tests use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import attrs

from bench.common import REPO, free_port

# 1 MB of gzip that inflates to 1 GiB of zeros.
BOMB_INFLATED = 1 << 30
HEALTH_EVERY_S = 0.02
SLOW_SOURCES = tuple(f"127.0.0.{i}" for i in range(2, 10))
SLOW_HEADER = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"


def gzip_bomb(inflated: int = BOMB_INFLATED) -> bytes:
    """A gzip body of about inflated/1000 bytes that inflates to `inflated` zeros.

    Built in milliseconds, not by deflating it all: after a full flush the deflater
    starts afresh, so every further MiB of zeros compresses to the very same bytes.
    """
    mib = bytes(1 << 20)
    d = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = d.compress(mib) + d.flush(zlib.Z_FULL_FLUSH)
    again = d.compress(mib) + d.flush(zlib.Z_FULL_FLUSH)
    n = max(1, inflated >> 20)
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(mib, crc)
    # A last, empty fixed-Huffman block (b"\x03\x00"), then CRC-32 and size mod 2**32.
    tail = b"\x03\x00" + struct.pack("<II", crc, (n << 20) & 0xFFFFFFFF)
    return first + again * (n - 1) + tail


def bomb_request(path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def send_bomb(port: int, data: bytes) -> str:
    """Send one bomb; its answer as "413 request_too_large" (or what went wrong)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return f"connect: {exc.strerror or exc}"
    try:
        writer.write(data)
        await writer.drain()
        answer = await reader.read()
    except (ConnectionError, OSError) as exc:
        return f"reset ({type(exc).__name__})"
    finally:
        writer.close()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "?"
    code = (
        answer.split(b'"code": "', 1)[1].split(b'"', 1)[0].decode()
        if b'"code": "' in answer
        else ""
    )
    return f"{status} {code}".strip()


async def health_once(port: int, limit_s: float = 10.0) -> float | None:
    """Seconds for one GET /health on a fresh connection; None if it failed."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
    except (TimeoutError, OSError):
        return None
    return time.perf_counter() - t0 if answer.startswith(b"HTTP/1.1 200") else None


@attrs.define
class Watch:
    """/health latency and the service's RSS, sampled until stopped."""

    port: int
    pid: int | None  # None: latency only
    latencies: list[float] = attrs.Factory(list)
    failures: int = 0
    rss_mb: list[float] = attrs.Factory(list)

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._health(stop))
            tg.create_task(self._rss(stop))

    async def _health(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            took = await health_once(self.port)
            if took is None:
                self.failures += 1
            else:
                self.latencies.append(took)
            await asyncio.sleep(HEALTH_EVERY_S)

    async def _rss(self, stop: asyncio.Event) -> None:
        while self.pid is not None and not stop.is_set():
            self.rss_mb.append(rss_mb(self.pid))
            await asyncio.sleep(0.005)

    def health(self) -> str:
        if not self.latencies:
            return f"no answer ({self.failures} failed)"
        ms = sorted(1000 * x for x in self.latencies)
        failed = f", {self.failures} failed" if self.failures else ""
        return f"p50 {statistics.median(ms):7.1f} ms  max {ms[-1]:7.1f} ms ({len(ms)}{failed})"


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@attrs.frozen
class BombRound:
    bombs: int
    answers: tuple[str, ...]
    health: str
    max_health_s: float | None
    rss_before_mb: float
    rss_peak_mb: float


async def bomb_round(port: int, pid: int, path: str, n: int, body: bytes) -> BombRound:
    """`n` bombs at once, /health and RSS watched from just before to just after."""
    data = bomb_request(path, body)
    watch, stop = Watch(port, pid), asyncio.Event()
    before = rss_mb(pid)
    watching = asyncio.create_task(watch.run(stop))
    await asyncio.sleep(0.2)
    answers = await asyncio.gather(*(send_bomb(port, data) for _ in range(n)))
    await asyncio.sleep(0.3)
    stop.set()
    await watching
    return BombRound(
        bombs=n,
        answers=tuple(answers),
        health=watch.health(),
        max_health_s=max(watch.latencies) if watch.latencies else None,
        rss_before_mb=before,
        rss_peak_mb=max(watch.rss_mb, default=0.0),
    )


@attrs.frozen
class Slowloris:
    opened: int
    failed_to_open: int
    # Seconds each connection lived (None: still open when the watch ended).
    lifetimes: tuple[float | None, ...]
    health: str

    def open_after(self, seconds: float) -> int:
        return sum(1 for x in self.lifetimes if x is None or x > seconds)

    def max_lifetime(self) -> float | None:
        done = [x for x in self.lifetimes if x is not None]
        return max(done) if done else None


async def _slow_connection(port: int, source: str, watch_s: float) -> float | str | None:
    """One connection trickling its headers at 1 byte/s: seconds until the server
    closed it, None if still open after `watch_s`, or why it could not open."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError as exc:
        sock.close()
        return exc.strerror or type(exc).__name__
    opened = time.monotonic()

    async def trickle() -> None:
        writer.write(SLOW_HEADER)
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                await asyncio.sleep(1.0)
                writer.write(b"a")

    trickling = asyncio.create_task(trickle())
    try:
        async with asyncio.timeout(watch_s):
            while await reader.read(4096):
                pass  # an answer (a 429, a 408) before the close: still open until EOF
        return time.monotonic() - opened
    except TimeoutError:  # (an OSError too: first)
        return None
    except (ConnectionError, OSError):
        return time.monotonic() - opened
    finally:
        trickling.cancel()
        writer.close()


async def slowloris(
    port: int, n: int, watch_s: float, sources: Sequence[str] = SLOW_SOURCES
) -> Slowloris:
    """`n` slow connections spread over `sources`, opened in batches (the listen
    backlog is finite); /health watched from 127.0.0.1 all along."""
    watch, stop = Watch(port, None), asyncio.Event()
    health = asyncio.create_task(watch.run(stop))
    tasks = []
    for i in range(n):
        src = sources[i % len(sources)]
        tasks.append(asyncio.create_task(_slow_connection(port, src, watch_s)))
        if i % 100 == 99:
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*tasks)
    stop.set()
    await health
    lifetimes = tuple(r for r in results if not isinstance(r, str))
    return Slowloris(
        opened=len(lifetimes),
        failed_to_open=n - len(lifetimes),
        lifetimes=lifetimes,
        health=watch.health(),
    )


def raise_fd_limit(need: int) -> int:
    """The soft limit on open files raised towards the hard one; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# -- the services ------------------------------------------------------------------------


@attrs.define
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    path: str = "/v1/chat/completions"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(name: str, src: Path, root: Path) -> Service:
    """`cortex serve` (no neuron, an empty catalogue) or `neuron serve` (no model),
    from the tree `src`, with their defaults."""
    port = free_port()
    home = root / name
    home.mkdir()
    if name == "cortex":
        (home / "models.toml").write_text("models = []\n")
        (home / "c.toml").write_text(f'port = {port}\ncatalogue = "models.toml"\n')
    else:
        (home / "c.toml").write_text(f'port = {port}\nstore_dir = "{home / "store"}"\n')
    env = {**os.environ, "PYTHONPATH": str(src)}
    log = (home / "log").open("ab")
    argv = [sys.executable, "-m", f"{name}.cli", "serve", "-c", str(home / "c.toml")]
    proc = subprocess.Popen(argv, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    service = Service(name, port, proc)
    deadline = time.monotonic() + 60
    while asyncio.run(health_once(port, 2.0)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"{name} did not start:\n{(home / 'log').read_text()[-2000:]}")
        time.sleep(0.2)
    return service


async def measure(service: Service, bombs: Sequence[int], slow: int, watch_s: float) -> None:
    body = gzip_bomb()
    pid = service.process.pid
    print(f"\n{service.name} (pid {pid}), RSS at rest {rss_mb(pid):.0f} MB")
    print(f"  gzip bombs of {len(body) / 1e6:.2f} MB inflating to {BOMB_INFLATED >> 30} GiB:")
    for n in bombs:
        r = await bomb_round(service.port, pid, service.path, n, body)
        answers = ", ".join(f"{a} x{r.answers.count(a)}" for a in sorted(set(r.answers)))
        print(
            f"  {n} bomb(s): /health {r.health}; RSS {r.rss_before_mb:.0f} -> peak "
            f"{r.rss_peak_mb:.0f} MB; answers: {answers}"
        )
    if slow:
        s = await slowloris(service.port, slow, watch_s)
        longest = s.max_lifetime()
        print(
            f"  slowloris, {s.opened} connections opened ({s.failed_to_open} could not): "
            f"open after 12 s: {s.open_after(12.0)}, after {watch_s:g} s: "
            f"{s.open_after(watch_s)}; longest closed one lived "
            f"{'-' if longest is None else f'{longest:.1f} s'}; /health {s.health}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=REPO, help="the tree to run (default: this one)")
    p.add_argument("--services", default="cortex,neuron", help="(default: cortex,neuron)")
    p.add_argument("--bombs", default="1,4,8", help="concurrent bombs per round (default: 1,4,8)")
    p.add_argument("--slowloris", type=int, default=2000, help="connections (0: skip)")
    p.add_argument("--watch", type=float, default=45.0, help="slowloris watch, seconds")
    args = p.parse_args(argv)
    bombs = [int(x) for x in args.bombs.split(",") if x]
    limit = raise_fd_limit(args.slowloris + 256)
    print(f"tree {args.src.resolve()}; {os.cpu_count()} CPUs; open files limit {limit}")
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        for name in args.services.split(","):
            service = start(name, args.src.resolve(), Path(tmp))
            try:
                asyncio.run(measure(service, bombs, args.slowloris, args.watch))
            finally:
                service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
