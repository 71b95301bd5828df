"""Real-model fleet throughput under guidellm: cortex, a neuron, and mlx_lm.server straight.

`python -m bench.fleet [--quick] [--concurrency 1,4,16] [--replicas 1,2]` (make bench-fleet)

The load generator is guidellm (the vLLM project's; `guidellm run`, installed by
`make bench-fleet` into .venv/guidellm from this project's `bench` extra), sending
its synthetic chat prompts (`--prompt-tokens` of faker text, `--output-tokens`
asked for) to SmolLM2-135M-Instruct (`neuron real-model`, bfloat16 where MLX
computes on the CPU, as the tests use it; guidellm reads its tokenizer from the
same directory), streamed, at each load: guidellm's synchronous profile (one
request at a time) and its concurrent profile at each other `--concurrency`.

One replica: one neuron serving the model, and a cortex in front of it.
  mlx_lm.server  guidellm straight at the neuron's runner (the same process, so the
                 same model in memory and the same batching: only the hops differ)
  neuron         through the neuron
  cortex         through cortex, then the neuron
The arms take turns at each load, the order reversed from one load to the next,
so the machine's drift falls on all of them.

Two replicas (`--replicas 1,2`): a second neuron, and a cortex whose catalogue asks
for two replicas (one on each neuron).
  cortex x2                guidellm through cortex (it spreads the streams)
  mlx_lm.server x2 split   two guidellm processes at once, each with half the
                           streams and requests, straight at one runner each;
                           their tok/s added up (concurrent loads only)
On this 2-CPU machine the two runners contend: they share its two cores (about one
each) with guidellm, cortex and the neurons, so the two-replica rows show what the
fleet adds at two replicas and how far two runners on one box go, not the scaling two
machines would give. The CPU the runners used during each run (from /proc, in cores)
is printed beside the figures.

Every guidellm run uses its own seed (new prompts: no runner's prompt cache holds
a whole prompt from an earlier run; only the chat template's system prefix is
shared, as between real users). Reported per arm and load: TTFT p50, inter-token
latency p50, output tok/s (guidellm's), and the ratios against mlx_lm.server
straight in the same run, then the targets: through cortex >= 0.97x of
mlx_lm.server's output tok/s at each load, TTFT added <= 5 ms p50. A run that lost
requests (errored, or cut by `--max-seconds`) leaves cortex's and the neurons'
traces in the work dir (`--keep` keeps it).
Updates BENCHMARKS.md unless --no-write (never with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from bench import benchmarks_md
from bench.affinity import routed
from bench.common import (
    RUNNER_MODEL_NAME,
    Procs,
    Target,
    children,
    cpu_seconds,
    free_port,
    one_request,
    wait_http,
    workdir,
)
from bench.fleet_report import Run, combine, overlap, parse_report
from shared.blocking_http import request_json

MODEL_ID = "smollm2-135m"
GUIDELLM = Path(__file__).resolve().parent.parent / ".venv" / "guidellm" / "bin" / "guidellm"
RUNNER = "mlx_lm.server"
NEURON = "neuron"
CORTEX = "cortex"
CORTEX2 = "cortex x2"
SPLIT = "mlx_lm.server x2 split"
ONE_REPLICA = (RUNNER, NEURON, CORTEX)
TOKENS_FLOOR = 0.97
TTFT_ADDED_MS = 5.0


@attrs.frozen
class Load:
    streams: int  # 1: guidellm's synchronous profile
    requests: int

    @property
    def name(self) -> str:
        return "sync" if self.streams == 1 else f"c={self.streams}"


@attrs.frozen
class Workload:
    prompt_tokens: int
    output_tokens: int
    max_seconds: float  # a cap per guidellm benchmark, whatever the machine does


@attrs.define
class Bench:
    """What every guidellm run needs, and the fleet's processes."""

    procs: Procs
    root: Path
    guidellm: str
    model_dir: Path
    work: Workload
    seed: int = 1000
    neurons: list[str] = attrs.Factory(list)
    # Where to read traces from when a run lost requests (cortex's, the neurons').
    traces: list[str] = attrs.Factory(list)
    warmed: set[str] = attrs.Factory(set)

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def runner_cpu(self) -> float:
        """CPU seconds so far of every runner (the neurons' child processes)."""
        neurons = [p.pid for name, p in self.procs.procs if name.startswith("n")]
        return sum(cpu_seconds(pid) for n in neurons for pid in children(n))


def with_cpu(run: Run, cpu_before: float, cpu_after: float) -> Run:
    span = run.end - run.start
    return attrs.evolve(run, runner_cores=(cpu_after - cpu_before) / span if span > 0 else 0.0)


def guidellm_argv(b: Bench, target: Target, load: Load, out: Path, seed: int) -> list[str]:
    """One `guidellm run`: one target, one load, a JSON report at `out`."""
    if load.streams == 1:
        profile: dict[str, Any] = {"kind": "synchronous"}
    else:
        profile = {"kind": "concurrent", "streams": [load.streams]}
    backend = {
        "kind": "openai_http",
        "target": target.base_url,
        "model": target.model,
        "timeout": 600,
    }
    data = {
        "kind": "synthetic_text",
        "prompt_tokens": b.work.prompt_tokens,
        "output_tokens": b.work.output_tokens,
    }
    return [
        b.guidellm,
        "run",
        "--backend",
        json.dumps(backend),
        "--tokenizer",
        json.dumps({"kind": "hf_auto", "model": str(b.model_dir)}),
        "--data",
        json.dumps(data),
        "--profile",
        json.dumps(profile),
        "--constraint",
        json.dumps({"kind": "max_requests", "count": load.requests}),
        "--constraint",
        json.dumps({"kind": "max_duration", "seconds": b.work.max_seconds}),
        "--seed",
        json.dumps({"kind": "static", "value": seed}),
        "--output",
        json.dumps({"kind": "json", "path": str(out)}),
        "--disable-console",
    ]


def start_guidellm(b: Bench, tag: str, target: Target, load: Load) -> tuple[Any, Path]:
    out = b.root / f"{tag}.json"
    log = (b.root / "logs" / f"guidellm-{tag}.log").open("wb")
    # The tokenizer is a local directory: never ask a hub (no machine here reaches one).
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = guidellm_argv(b, target, load, out, b.next_seed())
    proc = subprocess.Popen(argv, cwd=b.root, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, out


def finish_guidellm(b: Bench, tag: str, proc: Any, out: Path) -> Run:
    timeout = b.work.max_seconds + 300.0  # its own cap, plus start-up and the report
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"guidellm {tag} still running after {timeout:.0f} s") from None
    if proc.returncode != 0 or not out.exists():
        tail = (b.root / "logs" / f"guidellm-{tag}.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"guidellm {tag} exited {proc.returncode}:\n{tail}")
    runs = parse_report(json.loads(out.read_text()))
    if len(runs) != 1:
        raise RuntimeError(f"guidellm {tag}: {len(runs)} benchmarks in {out}, expected 1")
    return runs[0]


def measure(b: Bench, tag: str, target: Target, load: Load) -> Run:
    b.procs.check()
    cpu = b.runner_cpu()
    proc, out = start_guidellm(b, tag, target, load)
    run = with_cpu(finish_guidellm(b, tag, proc, out), cpu, b.runner_cpu())
    if run.errored or run.incomplete:
        post_mortem(b, tag)
    return run


def post_mortem(b: Bench, tag: str) -> None:
    """Requests errored or never finished: keep what cortex and the neurons traced."""
    found = {}
    for url in b.traces:
        try:
            _, answer, _ = request_json("GET", url, timeout=10.0)
        except OSError as exc:
            answer = {"error": repr(exc)}
        found[url] = answer
    path = b.root / f"traces-{tag}.json"
    path.write_text(json.dumps(found, indent=1))
    print(f"  {tag}: requests lost; traces in {path} (--keep keeps them)", flush=True)


def measure_split(b: Bench, tag: str, runners: Sequence[Target], load: Load) -> Run:
    """Half the streams and requests straight at each runner, all at once."""
    share = Load(max(1, load.streams // len(runners)), max(1, load.requests // len(runners)))
    cpu = b.runner_cpu()
    started = [start_guidellm(b, f"{tag}-{i}", t, share) for i, t in enumerate(runners)]
    halves = [finish_guidellm(b, f"{tag}-{i}", p, o) for i, (p, o) in enumerate(started)]
    run = with_cpu(combine(halves), cpu, b.runner_cpu())
    print(f"  (split halves overlapped {overlap(halves):.0%} of their span)", flush=True)
    return run


def write_neuron(root: Path, name: str, model_dir: Path, streams: int) -> tuple[Path, str]:
    port = free_port()
    conf = root / f"{name}.toml"
    # Room for every stream at once, so the runner (not admission) sets the pace.
    conf.write_text(
        f'host = "127.0.0.1"\nport = {port}\nstore_dir = "{root / name / "store"}"\n'
        f'node_name = "{name}"\nmodel_roots = ["{model_dir.parent}"]\n'
        f"[runner]\ndecode_concurrency = {streams}\nmax_tokens = 512\n"
        f"[admission]\nmax_in_flight = {2 * streams}\nmax_queue = {4 * streams}\n"
    )
    return conf, f"http://127.0.0.1:{port}"


def start_neuron(b: Bench, name: str, streams: int) -> str:
    conf, url = write_neuron(b.root, name, b.model_dir, streams)
    b.procs.start(name, [sys.executable, "-m", "neuron.cli", "serve", "-c", str(conf)])
    wait_http(f"{url}/health", b.procs, 60.0)
    b.neurons.append(url)
    b.traces.append(f"{url}/traces?limit=100")
    return url


def start_cortex(b: Bench, replicas: int) -> tuple[Any, str]:
    """A cortex over every neuron so far, its catalogue asking for `replicas` copies."""
    (b.root / f"models-{replicas}.toml").write_text(
        f'[[models]]\nid = "{MODEL_ID}"\nsource = "{b.model_dir}"\ncontext_limit = 8192\n'
        f"replicas = {replicas}\nkeep_loaded = true\n"
    )
    port = free_port()
    refs = "".join(f'[[neurons]]\nname = "n{i}"\nurl = "{u}"\n\n' for i, u in enumerate(b.neurons))
    conf = b.root / f"cortex-{replicas}.toml"
    conf.write_text(
        f'host = "127.0.0.1"\nport = {port}\ncatalogue = "models-{replicas}.toml"\n'
        f"poll_interval_s = 1.0\n\n{refs}"
    )
    proc = b.procs.start(
        f"cortex-{replicas}", [sys.executable, "-m", "cortex.cli", "serve", "-c", str(conf)]
    )
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health", b.procs, 60.0)
    b.traces.append(f"{base}/admin/traces?limit=100")
    return proc, base


def runners(b: Bench, count: int, timeout_s: float) -> list[Target]:
    """Until `count` neurons serve the model (cortex's reconciler loads it); their runners."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        b.procs.check()
        found = []
        for url in b.neurons:
            _, answer, _ = request_json("GET", f"{url}/models")
            for m in answer.get("models", []) if isinstance(answer, dict) else []:
                if m.get("model_id") != MODEL_ID:
                    continue
                if m.get("state") == "failed":
                    raise RuntimeError(f"{MODEL_ID} failed on {url}: {m.get('error')}")
                if m.get("state") == "ready" and m.get("port"):
                    base = f"http://127.0.0.1:{m['port']}"
                    found.append(Target(RUNNER, base, RUNNER_MODEL_NAME))
        if len(found) >= count:
            return found
        time.sleep(0.5)
    raise RuntimeError(f"{MODEL_ID} not ready on {count} neuron(s) within {timeout_s:.0f} s")


def warm(b: Bench, targets: Sequence[Target]) -> None:
    """A fresh runner's first requests are slow (MLX builds its kernels for each new
    shape): one request, then four at once, on every runner, before any arm is timed."""

    async def go() -> None:
        text = " ".join(["warm"] * b.work.prompt_tokens)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for t in targets:
                for n in (1, 4):
                    await asyncio.gather(
                        *(one_request(session, t, text, b.work.output_tokens) for _ in range(n))
                    )

    began = time.monotonic()
    asyncio.run(go())
    b.warmed.update(t.base_url for t in targets)
    print(f"warmed {len(targets)} runner(s) in {time.monotonic() - began:.0f} s", flush=True)


def stop(b: Bench, proc: Any) -> None:
    proc.terminate()
    proc.wait(timeout=30)
    b.procs.procs = [(n, p) for n, p in b.procs.procs if p is not proc]


def show(arm: str, load: Load, run: Run, began: float) -> None:
    print(
        f"{arm:24s} {load.name:6s} ok {run.ok:3d} err {run.errored} inc {run.incomplete}"
        f"  TTFT p50 {run.ttft_p50_ms:8.1f} ms  ITL p50 {run.itl_p50_ms:7.1f} ms"
        f"  {run.output_tps:6.2f} tok/s  runners {run.runner_cores:.2f} cores"
        f"  ({time.monotonic() - began:.0f} s)",
        flush=True,
    )


Results = dict[tuple[str, int], Run]


def one_replica(b: Bench, loads: Sequence[Load], streams: int) -> Results:
    start_neuron(b, "n1", streams)
    cortex, base = start_cortex(b, 1)
    (runner,) = runners(b, 1, 300.0)
    routed(base, MODEL_ID, 1, b.procs, 60.0)
    warm(b, [runner])
    targets = {
        RUNNER: runner,
        NEURON: Target(NEURON, b.neurons[0], MODEL_ID),
        CORTEX: Target(CORTEX, base, MODEL_ID),
    }
    print(f"one replica: runner {runner.base_url}, neuron {b.neurons[0]}, cortex {base}")
    out: Results = {}
    for i, load in enumerate(loads):
        for arm in ONE_REPLICA if i % 2 == 0 else ONE_REPLICA[::-1]:
            began = time.monotonic()
            out[arm, load.streams] = measure(b, f"{arm}-{load.name}", targets[arm], load)
            show(arm, load, out[arm, load.streams], began)
    stop(b, cortex)
    return out


def two_replicas(b: Bench, loads: Sequence[Load], streams: int, split: bool) -> Results:
    start_neuron(b, "n2", streams)
    _, base = start_cortex(b, 2)
    pair = runners(b, 2, 300.0)
    routed(base, MODEL_ID, 2, b.procs, 60.0)
    warm(b, [t for t in pair if t.base_url not in b.warmed])
    print(f"two replicas: runners {', '.join(t.base_url for t in pair)}, cortex {base}")
    out: Results = {}
    for i, load in enumerate(loads):
        arms = [CORTEX2, SPLIT] if i % 2 == 0 else [SPLIT, CORTEX2]
        for arm in arms:
            began = time.monotonic()
            if arm == CORTEX2:
                run = measure(b, f"cortex2-{load.name}", Target(CORTEX2, base, MODEL_ID), load)
            elif split and load.streams >= len(pair):
                run = measure_split(b, f"split-{load.name}", pair, load)
            else:
                continue
            out[arm, load.streams] = run
            show(arm, load, run, began)
    return out


def fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def peer_of(arm: str, streams: int, results: Results) -> tuple[str, Run | None]:
    """What an arm is compared with: mlx_lm.server straight at the same replica count
    (the split runners at two), else one mlx_lm.server."""
    if arm == CORTEX2 and (SPLIT, streams) in results:
        return SPLIT, results[SPLIT, streams]
    return RUNNER, results.get((RUNNER, streams))


def row(arm: str, load: Load, r: Run, results: Results) -> str:
    peer_name, peer = peer_of(arm, load.streams, results)
    if peer is None or peer is r:
        versus = "- | - | -"
    else:
        tps = fmt(ratio(r.output_tps, peer.output_tps), ".3f")
        versus = f"{tps}x | {fmt(r.ttft_p50_ms - peer.ttft_p50_ms, '+.1f')} | {peer_name}"
    return (
        f"| {2 if arm in (CORTEX2, SPLIT) else 1} | {arm} | {load.name}"
        f" | {r.ok}/{r.errored}/{r.incomplete} | {fmt(r.ttft_p50_ms, '.1f')}"
        f" | {fmt(r.itl_p50_ms, '.1f')} | {r.output_tps:.2f} | {versus}"
        f" | {fmt(r.runner_cores, '.2f')} |"
    )


def table(results: Results, loads: Sequence[Load]) -> str:
    rows = [
        "| replicas | arm | load | requests ok/err/inc | TTFT p50 ms | ITL p50 ms"
        " | output tok/s | tok/s vs peer | TTFT added p50 ms | peer | runner CPU, cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in (*ONE_REPLICA, CORTEX2, SPLIT):
        for load in loads:
            r = results.get((arm, load.streams))
            if r is not None:
                rows.append(row(arm, load, r, results))
    return "\n".join(rows)


def verdicts(results: Results, loads: Sequence[Load]) -> list[str]:
    """The targets, at each load: cortex/mlx_lm.server output tok/s and TTFT added."""
    lines = []
    for load in loads:
        c, r = results.get((CORTEX, load.streams)), results.get((RUNNER, load.streams))
        if c is None or r is None:
            continue
        tps = ratio(c.output_tps, r.output_tps)
        added = c.ttft_p50_ms - r.ttft_p50_ms
        ok_tps = tps >= TOKENS_FLOOR
        ok_ttft = added <= TTFT_ADDED_MS
        lines.append(
            f"- {load.name}: cortex/{RUNNER} output tok/s = {fmt(tps, '.3f')}x"
            f" (target >= {TOKENS_FLOOR}x: {'met' if ok_tps else 'MISSED'}); TTFT added p50"
            f" = {fmt(added, '+.1f')} ms (target <= {TTFT_ADDED_MS:.0f} ms:"
            f" {'met' if ok_ttft else 'MISSED'})"
        )
    return lines


def scaling(results: Results, loads: Sequence[Load]) -> list[str]:
    lines = []
    for load in loads:
        one, two = results.get((CORTEX, load.streams)), results.get((CORTEX2, load.streams))
        if one and two:
            lines.append(
                f"- {load.name}: cortex, two replicas / one = "
                f"{fmt(ratio(two.output_tps, one.output_tps), '.2f')}x output tok/s"
            )
    return lines


def loads_for(concurrency: str, requests: str | None, quick: bool) -> list[Load]:
    """`--concurrency 1,4,16` (1: synchronous); requests per load: 12 synchronous, two
    waves of every stream (at least 16) concurrent, unless `--requests` says."""
    streams = [int(c) for c in concurrency.split(",") if c]
    if requests:
        counts = [int(n) for n in requests.split(",")]
        if len(counts) != len(streams):
            raise SystemExit("--requests needs one count per --concurrency entry")
    elif quick:
        counts = [4 if s == 1 else s * 2 for s in streams]
    else:
        counts = [12 if s == 1 else max(16, 2 * s) for s in streams]
    return [Load(s, n) for s, n in zip(streams, counts, strict=True)]


def default_dtype() -> str:
    """As the tests choose (tests/conftest.py real_model_dtype): bfloat16 where MLX
    computes on the CPU (prefill about twice as fast there), else the quantized model."""
    import mlx.core as mx

    return "bfloat16" if mx.default_device().type == mx.DeviceType.cpu else "quantized"


def real_model(dtype: str) -> Path:
    from neuron.store.real_model import DTYPES, build_real_model, cache_model_name
    from neuron.store.real_model import default_cache_dir as cache

    for known in DTYPES:
        if known == dtype:
            return build_real_model(cache() / "models" / cache_model_name(known), dtype=known)
    raise SystemExit(f"--dtype {dtype!r}: expected one of {DTYPES}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fleet",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: make bench-fleet   (or: make bench-fleet BENCH_ARGS=--quick)",
    )
    p.add_argument("--concurrency", default=None, help="streams per load, 1 = synchronous")
    p.add_argument("--requests", default=None, help="requests per load (comma-separated)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 32 (quick 16)")
    p.add_argument("--output-tokens", type=int, default=None, help="default 16 (quick 8)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="cap per guidellm run")
    p.add_argument("--replicas", default="1,2", help="1, or 1,2 (adds the two-replica arms)")
    p.add_argument("--no-split", action="store_true", help="no split-runner peer at 2")
    p.add_argument("--dtype", default=None, help="quantized or bfloat16 (default: as tests)")
    p.add_argument("--guidellm", default=str(GUIDELLM), help="the guidellm command")
    p.add_argument("--quick", action="store_true", help="a smoke run: sync and c=4, short")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, reports)")
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = args.concurrency or ("1,4" if quick else "1,4,16")
    args.prompt_tokens = args.prompt_tokens or (16 if quick else 32)
    args.output_tokens = args.output_tokens or (8 if quick else 16)
    return args


def find_guidellm(given: str) -> str:
    path = shutil.which(given) or (given if Path(given).is_file() else None)
    if path is None:
        raise SystemExit(
            f"guidellm not found at {given}: `make bench-fleet` installs it into "
            ".venv/guidellm (pip install -e '.[bench]' in a venv of its own)"
        )
    # Absolute: guidellm runs in the scratch dir.
    return os.path.abspath(path)


@attrs.frozen
class Setup:
    guidellm: str
    model_dir: Path
    work: Workload
    loads: list[Load]
    replicas: list[int]
    split: bool


def run_all(s: Setup, keep: bool) -> Results:
    streams = max(load.streams for load in s.loads)
    results: Results = {}
    with workdir("bench-fleet-", keep) as root:
        b = Bench(Procs(root), root, s.guidellm, s.model_dir, s.work)
        try:
            results.update(one_replica(b, s.loads, streams))
            if 2 in s.replicas:
                results.update(two_replicas(b, s.loads, streams, s.split))
        finally:
            b.procs.stop()
    return results


def contention(results: Results, loads: Sequence[Load]) -> str:
    """What two replicas on this machine's CPUs mean, with the CPU the runners used."""
    top = max(load.streams for load in loads)
    one, two = results.get((RUNNER, top)), results.get((CORTEX2, top))
    used = ""
    if one is not None and two is not None:
        used = (
            f" (at c={top} one replica's runner used {one.runner_cores:.2f} cores,"
            f" two replicas' runners {two.runner_cores:.2f} together)"
        )
    return (
        f"- two replicas on this {os.cpu_count()}-CPU machine contend: the two runners share"
        f" its cores, about one each{used}, and with guidellm, cortex and the neurons. The"
        " x2 rows show what the fleet adds at two replicas and how far two runners on one"
        " box go; on two machines each replica would have its own CPUs."
    )


def report(s: Setup, results: Results, wall_s: float, load_avg: tuple[float, float]) -> str:
    w = s.work
    head = (
        f"SmolLM2-135M-Instruct ({s.model_dir.name}), guidellm {guidellm_version(s.guidellm)}"
        f" synthetic chat: {w.prompt_tokens} prompt tokens (plus the chat template's),"
        f" {w.output_tokens} output tokens asked for, streamed; requests per load: "
        + ", ".join(f"{load.name} {load.requests}" for load in s.loads)
        + f"; whole run {wall_s / 60:.1f} min; load average {load_avg[0]:.1f} at the"
        f" start, {load_avg[1]:.1f} at the end (other work shares this machine)."
    )
    parts = [head, "", table(results, s.loads), ""]
    parts += ["Targets (one replica, cortex vs mlx_lm.server straight, same run):"]
    parts += verdicts(results, s.loads)
    parts.append(
        "- TTFT here is mostly prefill on a CPU (seconds), and under concurrency it also"
        " depends on where a request lands in the runner's batch: differences of tens of"
        " ms between arms at sync, and of seconds at c>1, are run-to-run noise, far above"
        " the few ms a hop costs; the synchronous figure is the one that can show a hop."
    )
    more = scaling(results, s.loads)
    if more:
        parts += ["", "Two replicas:", *more, contention(results, s.loads)]
    return "\n".join(parts)


def guidellm_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    return out.stdout.strip().rsplit(" ", 1)[-1] or "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    setup = Setup(
        guidellm=find_guidellm(args.guidellm),
        model_dir=real_model(args.dtype or default_dtype()),
        work=Workload(args.prompt_tokens, args.output_tokens, args.max_seconds),
        loads=loads_for(args.concurrency, args.requests, args.quick),
        replicas=[int(r) for r in args.replicas.split(",") if r],
        split=not args.no_split,
    )
    began, load_start = time.monotonic(), os.getloadavg()[0]
    try:
        results = run_all(setup, args.keep)
    except KeyboardInterrupt:
        return 130
    loads = (load_start, os.getloadavg()[0])
    text = report(setup, results, time.monotonic() - began, loads)
    print()
    print(text)
    if not args.no_write and not args.quick:
        benchmarks_md.update("bench-fleet", "make bench-fleet", text)
        print(f"\nwrote BENCHMARKS.md ({benchmarks_md.machine()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
