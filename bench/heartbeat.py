"""The runner heartbeat's cost (issue 19): one probe's CPU, and decode throughput with it on.

`python -m bench.heartbeat [--quick] [--rounds 2] [--cycles 4] [--probes 2000]`
(make bench-heartbeat)

Every `runner.health_check_interval_s` (1 s) the neuron reads /proc/<pid>/stat of
each runner and sends it GET /health on a fresh connection (mlx_lm.server speaks
HTTP/1.0 and answers on a thread of its own, not on its generation thread). On
the tiny demo model by default: the worst case, since a token costs the least
there (a fixed probe cost is the largest share of the work) and its Python-bound
generation loop holds the GIL the longest.

1. One probe's cost. A neuron with the heartbeat off loads the model; the bench
   sends `--probes` GET /health one after another straight to the runner's port,
   with an aiohttp session set up as the neuron's, on uvloop as the neuron runs,
   and reads CPU before and after: the runner's (less its idle rate) and its own,
   per probe. Then `--paced-s` of probes 50 ms apart: spaced out, a probe finds
   cold caches and costs more, as a real heartbeat's does. Then probes 50 ms
   apart while 8 streams decode: their latency (a probe that needed a decode
   slot would wait for a whole generation).
2. Decode throughput with the heartbeat on. Each round starts four neurons, each
   with its own runner of the same model: heartbeat off (interval 3600 s), on
   (1 s), stressed (0.05 s: 20 probes/s), and off again (`off-b`: how far two
   identical arms differ here, the noise floor). One at a time (the others'
   neurons frozen with SIGSTOP, their heartbeats with them; a thawed one is used
   once its model is ready again), each idles (its heartbeat's own CPU, read
   from the stressed arm less `off`, gives the real heartbeat's cost per beat);
   then `--cycles` cycles, in rotating arm order, of one batch of streamed chat
   requests through the neuron at 1 and one at 8 streams: aggregate tokens/s,
   the ratio to `off`, the median and quartiles of the per-cycle ratios, and
   the runner's CPU per token.

Prints the tables and updates its BENCHMARKS.md section (not with `--quick`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import aiohttp
import attrs

from bench import benchmarks_md
from bench.common import (
    Procs,
    Sample,
    Target,
    children,
    cpu_seconds,
    free_port,
    one_request,
    workdir,
)
from bench.neuron import SHAPE_100M
from neuron.runner.process import RunnerProcess
from shared.blocking_http import request_json
from shared.serve import new_event_loop

T = TypeVar("T")

MODEL_ID = "bench"
# The neuron's probe timeout (runner.health_probe_timeout_s).
PROBE_TIMEOUT_S = 2.0
IDLE_S = 2.0
# Requests per batch at least (a batch at 1 stream lasts about as long as one at 8).
MIN_BATCH = 8
# After a neuron thaws, before its model's state is read.
SETTLE_S = 0.25
# The paced probes' spacing: the stressed heartbeat's interval.
PACE_S = 0.05


@attrs.frozen
class Arm:
    name: str
    interval_s: float


# `off-b` is `off` again on a runner of its own: how far two identical arms differ
# on this machine (the noise floor the other ratios are read against).
OFF, ON, STRESS, CONTROL = (
    Arm("off", 3600.0),
    Arm("on", 1.0),
    Arm("stress", 0.05),
    Arm("off-b", 3600.0),
)
ARMS = (OFF, ON, STRESS, CONTROL)


@attrs.frozen
class Node:
    """One neuron with the model loaded, and its runner."""

    procs: Procs
    target: Target
    runner_url: str
    neuron_pid: int
    runner_pid: int


@attrs.frozen
class Workload:
    concs: tuple[int, ...]
    requests_per_stream: int
    max_tokens: int


# --- starting a neuron with the model -----------------------------------------


def build(model: Path, kind: str) -> None:
    """The model under test: the tiny demo model, random weights of ~98M, or the real one."""
    py = sys.executable
    if kind == "real":
        argv = [py, "-m", "neuron.cli", "real-model", str(model)]
    else:
        argv = [py, "-m", "neuron.cli", "demo-model", str(model)]
        argv += SHAPE_100M if kind == "random" else ()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _wait(what: str, procs: Procs, deadline: float, ready: Callable[[], T | None]) -> T:
    while True:
        procs.check()
        with contextlib.suppress(OSError):
            got = ready()
            if got is not None:
                return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in time; see {procs.root}/logs/")
        time.sleep(0.1)


def start_node(root: Path, model: Path, interval_s: float) -> Node:
    """A neuron whose heartbeat beats every `interval_s`, with `model` ready."""
    root.mkdir()
    (root / "logs").mkdir()
    procs = Procs(root)
    port = free_port()
    (root / "neuron.toml").write_text(
        f'host = "127.0.0.1"\nport = {port}\nstore_dir = "{root / "store"}"\n'
        f'model_roots = ["{model.parent}"]\nnode_name = "bench-heartbeat"\n'
        "[runner]\ndecode_concurrency = 8\nmax_tokens = 512\n"
        f"health_check_interval_s = {interval_s}\n"
        "[admission]\nmax_in_flight = 16\nmax_queue = 64\n"
    )
    argv = [sys.executable, "-m", "neuron.cli", "serve", "-c", str(root / "neuron.toml")]
    try:
        neuron = procs.start("neuron", argv)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        _wait("neuron", procs, deadline, lambda: _answers(url))
        status, answer, _ = request_json(
            "POST", url + "/models/load", {"model_id": MODEL_ID, "source": str(model)}
        )
        if status != 202:
            raise RuntimeError(f"load refused: {status} {answer}")
        m = _wait("model", procs, deadline, lambda: _ready(url))
        runner_pid = _wait("runner pid", procs, deadline, lambda: _runner_pid(neuron.pid))
    except BaseException:
        procs.stop()
        raise
    return Node(
        procs,
        Target("neuron", url, MODEL_ID),
        f"http://127.0.0.1:{m['port']}",
        neuron.pid,
        runner_pid,
    )


def _answers(url: str) -> bool | None:
    return True if request_json("GET", url + "/health")[0] == 200 else None


def _ready(url: str) -> dict[str, Any] | None:
    _, answer, _ = request_json("GET", url + "/models")
    m = next((m for m in answer.get("models", []) if m.get("model_id") == MODEL_ID), None)
    if m and m.get("state") == "failed":
        raise RuntimeError(f"model failed: {m.get('error')}")
    return m if m and m.get("state") == "ready" else None


def _runner_pid(neuron_pid: int) -> int | None:
    """The neuron's child running the runner shim (`neuron.runner.main`)."""
    for pid in children(neuron_pid):
        with contextlib.suppress(OSError):
            if b"neuron.runner.main" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                return pid
    return None


# --- 1. one probe's cost --------------------------------------------------------


def probe_session() -> aiohttp.ClientSession:
    """A session as the neuron's supervisor opens it (a fresh connection per request)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        auto_decompress=False,
    )


async def probe(session: aiohttp.ClientSession, runner_url: str) -> float:
    """One heartbeat probe, as the supervisor's `_answers` sends it; its latency."""
    t = time.perf_counter()
    async with session.get(
        runner_url + "/health", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    ) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"runner /health answered {r.status}")
    return time.perf_counter() - t


@attrs.frozen
class Cost:
    """CPU per probe, µs: the runner's (its idle rate taken off) and the prober's."""

    probes: int
    runner_us: float
    prober_us: float

    @property
    def total_us(self) -> float:
        return self.runner_us + self.prober_us


@attrs.frozen
class ProbeCost:
    back_to_back: Cost  # probes one after another: warm caches, the least a probe costs
    paced: Cost  # one probe every PACE_S, as a heartbeat spaces them
    proc_read_us: float  # the heartbeat's /proc/<pid>/stat read
    idle_ms: tuple[float, float, float]  # probe latency p50/p99/max, runner idle
    busy_ms: tuple[float, float, float]  # the same while 8 streams decode
    busy_probes: int


def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(xs)
    return (s[len(s) // 2] * 1e3, s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, s[-1] * 1e3)


def proc_read_us(pid: int, n: int = 20_000) -> float:
    """The heartbeat's look at the process state (RunnerProcess.stopped), per call."""
    runner = cast(RunnerProcess, SimpleNamespace(pid=pid))
    t0 = time.process_time()
    for _ in range(n):
        RunnerProcess.stopped(runner)
    return (time.process_time() - t0) / n * 1e6


def measure_probe(root: Path, model: Path, k: int, paced_s: float, load: Workload) -> ProbeCost:
    """Part 1 on a neuron of its own (heartbeat off), on the neuron's event loop (uvloop)."""
    node = start_node(root / "probe", model, OFF.interval_s)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(probe_cost(node, k, paced_s, load))
    finally:
        node.procs.stop()


async def probe_cost(node: Node, k: int, paced_s: float, load: Workload) -> ProbeCost:
    pid = node.runner_pid
    # The idle runner's own CPU (a few ms/s), taken off below: read in 10 ms ticks,
    # over as long a window as the paced probes'.
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(max(IDLE_S, paced_s))
    idle_rate = (cpu_seconds(pid) - c0) / (time.perf_counter() - t0)
    async with probe_session() as session:
        for _ in range(20):  # the runner's handler code and our connector, warm
            await probe(session, node.runner_url)
        latencies: list[float] = []
        back_to_back = await probes(session, node, idle_rate, k, 0.0, latencies)
        paced = await probes(session, node, idle_rate, int(paced_s / PACE_S), PACE_S, [])
        busy = await probes_under_load(session, node, load)
    return ProbeCost(
        back_to_back,
        paced,
        proc_read_us(pid),
        quantiles(latencies),
        quantiles(busy),
        len(busy),
    )


async def probes(
    session: aiohttp.ClientSession,
    node: Node,
    idle_rate: float,
    k: int,
    gap_s: float,
    latencies: list[float],
) -> Cost:
    """`k` probes, `gap_s` apart; the runner's CPU (ticks of 10 ms: `k` large) and ours."""
    r0, o0, t0 = cpu_seconds(node.runner_pid), time.process_time(), time.perf_counter()
    for _ in range(k):
        latencies.append(await probe(session, node.runner_url))
        if gap_s:
            await asyncio.sleep(gap_s)
    wall = time.perf_counter() - t0
    runner_s = cpu_seconds(node.runner_pid) - r0 - idle_rate * wall
    return Cost(k, runner_s / k * 1e6, (time.process_time() - o0) / k * 1e6)


async def probes_under_load(
    session: aiohttp.ClientSession, node: Node, load: Workload
) -> list[float]:
    """Probe latencies, one probe every 50 ms, while 8 streams decode through the neuron."""
    conc = max(load.concs)
    work = asyncio.create_task(
        batch(node.target, batch_size(conc, load), conc, load.max_tokens, "load")
    )
    out: list[float] = []
    while not work.done():
        out.append(await probe(session, node.runner_url))
        await asyncio.sleep(0.05)
    samples, _ = await work
    check(samples, "load")
    return out


# --- 2. decode throughput, heartbeat on and off ------------------------------------


async def batch(
    t: Target, n: int, conc: int, max_tokens: int, nonce: str
) -> tuple[list[Sample], float]:
    """`n` streamed requests, `conc` at a time, each with a prompt of its own; the wall time."""
    sem = asyncio.Semaphore(conc)
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=900), connector=aiohttp.TCPConnector(limit=conc)
    ) as session:

        async def go(i: int) -> Sample:
            async with sem:
                return await one_request(session, t, f"[{nonce}-{i:03d}] Hi.", max_tokens)

        start = time.perf_counter()
        out = await asyncio.gather(*(go(i) for i in range(n)))
        return list(out), time.perf_counter() - start


def batch_size(conc: int, load: Workload) -> int:
    """Requests in one batch: at least MIN_BATCH, so a batch at 1 stream lasts too."""
    return max(MIN_BATCH, conc * load.requests_per_stream)


def check(samples: Sequence[Sample], what: str) -> None:
    bad = [s for s in samples if not s.ok]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} of {len(samples)} failed: {bad[0].error}")


@attrs.frozen
class Run:
    """One batch of one arm: tokens, wall time, the runner's CPU."""

    tokens: int
    wall_s: float
    runner_s: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s


@attrs.define
class Idle:
    """An arm's idle CPU (its heartbeat alone), neuron and runner, summed over rounds."""

    wall_s: float = 0.0
    neuron_s: float = 0.0
    runner_s: float = 0.0

    def rate_ms(self) -> tuple[float, float]:
        """Neuron and runner CPU, ms per second."""
        w = self.wall_s or 1.0
        return self.neuron_s / w * 1e3, self.runner_s / w * 1e3


@attrs.define
class Results:
    idle: dict[str, Idle]
    # (arm, streams) -> one Run per cycle, cycles aligned across arms
    runs: dict[tuple[str, int], list[Run]]


def pause(node: Node) -> None:
    """Freeze the neuron (its heartbeat with it); its runner idles meanwhile."""
    os.kill(node.neuron_pid, signal.SIGSTOP)


def thaw(node: Node) -> None:
    os.kill(node.neuron_pid, signal.SIGCONT)


async def resume(node: Node, arm: Arm) -> None:
    """Thaw the neuron, and wait until its model is ready again."""
    thaw(node)
    # A probe in flight as the neuron froze times out as it thaws (its clock has
    # jumped): the model is `stalled` until the next beat revives it. Its overdue
    # timers run first; every arm waits as long (no arm's batch follows a lull).
    await asyncio.sleep(SETTLE_S)
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        while True:
            async with s.get(node.target.base_url + "/models") as r:
                models = (await r.json()).get("models", [])
            state = next((m["state"] for m in models if m.get("model_id") == MODEL_ID), None)
            if state == "ready":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{arm.name}: model {state} 30 s after its neuron thawed")
            await asyncio.sleep(0.05)


async def idle_window(node: Node, seconds: float) -> Idle:
    n0, r0 = cpu_seconds(node.neuron_pid), cpu_seconds(node.runner_pid)
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    return Idle(
        time.perf_counter() - t0,
        cpu_seconds(node.neuron_pid) - n0,
        cpu_seconds(node.runner_pid) - r0,
    )


async def one_round(
    nodes: dict[str, Node], load: Workload, r: int, cycles: int, idle_s: float, out: Results
) -> None:
    """Each arm alone (the others' neurons frozen): warm and idle, then `cycles` of
    batches in rotating arm order, so that the machine's drift falls on all arms."""
    for arm in ARMS:
        node = nodes[arm.name]
        await resume(node, arm)
        # Generations as long as the batches': no first-use cost lands on one arm's batch.
        await batch(node.target, 2, 2, load.max_tokens, f"warm{r}")
        got = await idle_window(node, idle_s)
        acc = out.idle[arm.name]
        acc.wall_s, acc.neuron_s = acc.wall_s + got.wall_s, acc.neuron_s + got.neuron_s
        acc.runner_s += got.runner_s
        pause(node)
    for c in range(cycles):
        k = (r * cycles + c) % len(ARMS)
        for arm in ARMS[k:] + ARMS[:k]:
            node = nodes[arm.name]
            await resume(node, arm)
            for conc in load.concs:
                n = batch_size(conc, load)
                cpu0 = cpu_seconds(node.runner_pid)
                samples, wall = await batch(
                    node.target, n, conc, load.max_tokens, f"{r}.{c}.{conc}"
                )
                check(samples, f"{arm.name} c={conc}")
                used = cpu_seconds(node.runner_pid) - cpu0
                out.runs[(arm.name, conc)].append(Run(sum(s.tokens for s in samples), wall, used))
            pause(node)
        line = "  ".join(
            f"c={n} " + " ".join(f"{a.name} {out.runs[(a.name, n)][-1].tok_s:6.1f}" for a in ARMS)
            for n in load.concs
        )
        print(f"  round {r + 1} cycle {c + 1}/{cycles} tok/s: {line}", flush=True)


def throughput(
    root: Path, model: Path, load: Workload, rounds: int, cycles: int, idle_s: float
) -> Results:
    """Every round, a fresh neuron and runner per arm (a runner's own speed falls on
    no arm for good), all started at once, then used one at a time."""
    out = Results(
        {a.name: Idle() for a in ARMS}, {(a.name, c): [] for a in ARMS for c in load.concs}
    )
    for r in range(rounds):
        nodes: dict[str, Node] = {}
        t0 = time.monotonic()
        try:
            with ThreadPoolExecutor(len(ARMS)) as pool:
                starts = {
                    a.name: pool.submit(start_node, root / f"{a.name}-{r}", model, a.interval_s)
                    for a in ARMS
                }
                for name, f in starts.items():
                    with contextlib.suppress(Exception):  # re-raised below, all stopped
                        nodes[name] = f.result()
                        pause(nodes[name])
            for f in starts.values():
                f.result()
            print(f"round {r + 1}: {len(ARMS)} neurons up in {time.monotonic() - t0:.1f} s")
            asyncio.run(one_round(nodes, load, r, cycles, idle_s, out))
        finally:
            for node in nodes.values():
                with contextlib.suppress(ProcessLookupError):
                    thaw(node)  # a frozen process would not see its SIGTERM
                node.procs.stop()
    return out


# --- the report ---------------------------------------------------------------------


def probe_table(p: ProbeCost, idle: dict[str, Idle]) -> str:
    (n0, r0), (n1, r1) = idle[OFF.name].rate_ms(), idle[STRESS.name].rate_ms()
    beats = max(1e-9, 1 / STRESS.interval_s - 1 / OFF.interval_s)
    real = Cost(0, (r1 - r0) / beats * 1e3, (n1 - n0) / beats * 1e3)
    b, c = p.back_to_back, p.paced
    rows = [
        (f"{b.probes:,} one after another, straight to the runner", b),
        (f"{c.probes:,} paced {PACE_S * 1e3:g} ms apart, the same", c),
        ("the neuron's own heartbeat at 20/s, idle runner (stress less off, below)", real),
    ]
    return "\n".join(
        [
            "| one GET /health probe | runner µs CPU | prober µs CPU | total µs |",
            "|---|---|---|---|",
            *(
                f"| {what} | {x.runner_us:.0f} | {x.prober_us:.0f} | {x.total_us:.0f} |"
                for what, x in rows
            ),
            "",
            "The prober is aiohttp on uvloop with a fresh connection per probe, as the"
            f" neuron's supervisor; the /proc/<pid>/stat read costs {p.proc_read_us:.0f} µs"
            " more. At 1 probe/s per runner, paced:"
            f" {c.total_us / 1e4:.2f}% of one core per runner; its own heartbeat:"
            f" {real.total_us / 1e4:.2f}%. It scales with probes per second and runners:"
            f" 1% of one core at {1e4 / max(c.total_us, real.total_us):.1f} probes/s in all.",
            "",
            "| probe latency ms | p50 | p99 | max |",
            "|---|---|---|---|",
            "| runner idle | {:.2f} | {:.2f} | {:.2f} |".format(*p.idle_ms),
            "| while 8 streams decode ({} probes) | {:.2f} | {:.2f} | {:.2f} |".format(
                p.busy_probes, *p.busy_ms
            ),
            "",
            f"(the heartbeat calls a runner silent after {PROBE_TIMEOUT_S:g} s)",
        ]
    )


def quartiles(xs: Sequence[float]) -> str:
    if len(xs) < 2:
        return "-"
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return f"{statistics.median(xs):.3f}x [{q1:.3f}..{q3:.3f}]"


def throughput_table(res: Results, concs: Sequence[int]) -> str:
    out = [
        "| streams | heartbeat | probes/s | tok/s | vs off | per cycle vs off, median [IQR]"
        " | runner CPU ms per 1k tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for conc in concs:
        off = res.runs[("off", conc)]
        off_tok_s = sum(r.tokens for r in off) / sum(r.wall_s for r in off)
        for arm in ARMS:
            runs = res.runs[(arm.name, conc)]
            tokens = sum(r.tokens for r in runs)
            tok_s = tokens / sum(r.wall_s for r in runs)
            ratios = [a.tok_s / b.tok_s for a, b in zip(runs, off, strict=True)]
            cpu = sum(r.runner_s for r in runs) / tokens * 1e6
            rate = "-" if arm.interval_s > 60 else f"{1 / arm.interval_s:g}"
            out.append(
                f"| {conc} | {arm.name} ({arm.interval_s:g} s) | {rate} | {tok_s:.1f}"
                f" | {tok_s / off_tok_s:.3f}x | {quartiles(ratios)} | {cpu:.1f} |"
            )
    return "\n".join(out)


def idle_table(res: Results) -> str:
    out = ["| heartbeat, runner idle | neuron CPU ms/s | runner CPU ms/s |", "|---|---|---|"]
    for arm in ARMS:
        n, r = res.idle[arm.name].rate_ms()
        out.append(f"| {arm.name} ({arm.interval_s:g} s) | {n:.2f} | {r:.2f} |")
    return "\n".join(out)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.heartbeat",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: make bench-heartbeat   (or: python -m bench.heartbeat --quick)",
    )
    p.add_argument("--rounds", type=int, default=2, help="fresh neurons and runners per round")
    p.add_argument("--cycles", type=int, default=4, help="cycles over the arms per round")
    p.add_argument("--probes", type=int, default=2000, help="probes timed one after another")
    p.add_argument("--paced-s", type=float, default=4.0, help="seconds of probes 50 ms apart")
    p.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    p.add_argument("--requests-per-stream", type=int, default=4, help="per stream per batch")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    p.add_argument(
        "--model",
        choices=("demo", "random", "real"),
        default="demo",
        help="demo: the tiny demo model (default: the worst case); random: ~98M random"
        " weights; real: SmolLM2-135M-Instruct, 4-bit (a few tok/s here)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke run (1 round of 2 cycles, fewer probes)"
    )
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    args.idle_s = 2.0
    if args.quick:
        args.rounds, args.cycles, args.probes, args.paced_s, args.idle_s = 1, 2, 300, 1.5, 1.0
        args.requests_per_stream, args.max_tokens = 2, 32
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    load = Workload(
        tuple(int(c) for c in args.concurrency.split(",")),
        args.requests_per_stream,
        args.max_tokens,
    )

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    with workdir("bench-heartbeat-", args.keep) as root:
        model = root / "models" / "model"
        try:
            build(model, args.model)
            print(f"model built ({args.model}) in {time.monotonic() - t0:.1f} s", flush=True)
            cost = measure_probe(root, model, args.probes, args.paced_s, load)
            print(f"probe cost measured at {time.monotonic() - t0:.1f} s", flush=True)
            res = throughput(root, model, load, args.rounds, args.cycles, args.idle_s)
        except KeyboardInterrupt:
            return 130
    took = time.monotonic() - t0
    tables = [probe_table(cost, res.idle), idle_table(res), throughput_table(res, load.concs)]
    print("\n" + "\n\n".join(tables) + f"\n\n{took:.0f} s in all")
    head = (
        f"Model: {args.model}. Decode: streamed chat through the neuron, max_tokens"
        f" {args.max_tokens}, batches of {batch_size(1, load)} requests at 1 stream and"
        f" {batch_size(8, load)} at 8; {args.rounds} round(s) of {args.cycles} cycles over"
        f" the arms; {took:.0f} s in all."
    )
    note = (
        "How to read it: the CPU figures are the steady ones. The tok/s ratios are read"
        " against `off-b`, the `off` arm again on a runner of its own: where it differs"
        " from `off` as much as `on` or `stress` do, the heartbeat's effect is below"
        " this machine's noise (2 CPUs shared with other work)."
    )
    if not (args.quick or args.no_write):
        body = "\n\n".join([head, *tables, note])
        benchmarks_md.update("bench-heartbeat", "make bench-heartbeat", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
