"""POST /v1/embeddings through a neuron: batching, and the neuron against its runner.

`python -m bench.embeddings [--quick] [--inputs 64] [--concurrency 8]`

Builds a random-weight encoder of all-MiniLM-L6-v2's shape (384 dimensions, 6
layers, 12 heads; `--quick`: the tiny demo encoder), starts one neuron serving
it (kind "embedding"), and embeds the same N texts of about 60 tokens four ways:
one request carrying all N (the runner's padded micro-batches), N requests one
at a time, N requests C at a time (the runner batches what queued together),
and the one big request sent to the runner directly (strings: it tokenizes).
Prints inputs/s with ratios and the neuron's CPU per request; updates
BENCHMARKS.md. The vectors mean nothing; their cost is a real encoder's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from bench import benchmarks_md
from bench.common import Procs, console_script, cpu_seconds, free_port, wait_http, workdir
from shared.blocking_http import request_json

MODEL = "bench-embed"
IDLE_S = 5.0
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "fleet", "model")


def texts(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(40, 80))) for _ in range(n)]


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with session.post(url, json=body) as r:
        answer = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {answer}")
        return len(answer["data"])


async def timed(run: Callable[[], Awaitable[int]]) -> tuple[float, int]:
    t0 = time.perf_counter()
    got = await run()
    return time.perf_counter() - t0, got


Arm = tuple[float, float]  # (seconds, the neuron's CPU ms per request)


async def arms(
    neuron: str, runner: str, docs: list[str], concurrency: int, cpu: Callable[[], float]
) -> dict[str, Arm]:
    """Each arm with the same inputs (base64, as the openai SDK asks)."""
    url = neuron + "/v1/embeddings"
    body = {"model": MODEL, "encoding_format": "base64"}
    out: dict[str, Arm] = {}
    async with aiohttp.ClientSession() as s:
        await _post(s, url, {**body, "input": docs[:8]})  # warm the path

        async def one_request() -> int:
            return await _post(s, url, {**body, "input": docs})

        async def one_by_one() -> int:
            return sum([await _post(s, url, {**body, "input": d}) for d in docs])

        async def concurrent() -> int:
            gate = asyncio.Semaphore(concurrency)

            async def one(d: str) -> int:
                async with gate:
                    return await _post(s, url, {**body, "input": d})

            return sum(await asyncio.gather(*(one(d) for d in docs)))

        async def direct() -> int:
            return await _post(s, runner + "/v1/embeddings", {**body, "input": docs})

        n = len(docs)
        # The neuron's own CPU while idle (polls of its runner, watchdogs), so each
        # arm is charged only what its requests cost.
        idle0, t0 = cpu(), time.perf_counter()
        await asyncio.sleep(IDLE_S)
        idle_rate = (cpu() - idle0) / (time.perf_counter() - t0)
        for name, run, requests in (
            ("one request of N", one_request, 1),
            ("N requests, one at a time", one_by_one, n),
            (f"N requests, {concurrency} at a time", concurrent, n),
            ("one request of N, runner direct", direct, 0),
        ):
            cpu0 = cpu()
            seconds, got = await timed(run)
            assert got == n, (name, got)
            used = max(0.0, cpu() - cpu0 - idle_rate * seconds)
            out[name] = (seconds, 1000 * used / max(1, requests))
    return out


def table(results: dict[str, Arm], n: int) -> str:
    base = results["one request of N"][0]
    lines = [
        "| arm | inputs/s | vs one request | neuron CPU ms/request |",
        "|---|---|---|---|",
    ]
    for name, (seconds, cpu_ms) in results.items():
        cpu = "-" if "direct" in name else f"{cpu_ms:.2f}"
        lines.append(f"| {name} | {n / seconds:.1f} | {base / seconds:.2f}x | {cpu} |")
    return "\n".join(lines)


def matmul_gflops() -> tuple[float, float]:
    """MLX's and numpy's float32 matmul speed here (an encoder layer's shape): the
    encoder's cost is MLX's, and its CPU build may carry a slow reference BLAS."""
    import mlx.core as mx
    import numpy as np

    rows, inner, cols = 1024, 384, 1536
    a = np.random.rand(rows, inner).astype(np.float32)
    b = np.random.rand(inner, cols).astype(np.float32)
    ma, mb = mx.array(a), mx.array(b)
    flops = 2 * rows * inner * cols

    def rate(f: Callable[[], object]) -> float:
        f()
        t0 = time.perf_counter()
        for _ in range(5):
            f()
        return 5 * flops / (time.perf_counter() - t0) / 1e9

    return rate(lambda: mx.eval(ma @ mb)), rate(lambda: a @ b)


def _build(root: Path, quick: bool) -> Path:
    from neuron.store.demo_encoder import EncoderShape, build_demo_encoder

    shape = EncoderShape() if quick else EncoderShape(384, 6, 12)
    return build_demo_encoder(root / "encoder", shape=shape)


def run(quick: bool, n: int, concurrency: int) -> str:
    with workdir("bench-embed-") as root:
        model_dir = _build(root, quick)
        port = free_port()
        config = {
            "port": port,
            "store_dir": str(root / "store"),
            "model_roots": [str(root)],
            "admission": {"max_in_flight": 64, "max_queue": 4 * n},
            "load": [{"model_id": MODEL, "source": str(model_dir), "kind": "embedding"}],
        }
        (root / "neuron.toml").write_text(tomli_w.dumps(config))
        procs = Procs(root)
        try:
            neuron = procs.start("neuron", [console_script("neuron"), "serve", "-c", "neuron.toml"])
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", procs, 60)
            runner_port = _wait_ready(url, procs)
            runner = f"http://127.0.0.1:{runner_port}"
            results = asyncio.run(
                arms(url, runner, texts(n), concurrency, lambda: cpu_seconds(neuron.pid))
            )
        finally:
            procs.stop()
    shape = "tiny demo encoder" if quick else "random all-MiniLM-L6-v2 shape (384 x 6 layers)"
    mlx_rate, np_rate = matmul_gflops()
    note = (
        f"Model: {shape}; N = {n} texts of 40-80 words; base64 answers. "
        f"Float32 matmul here: MLX {mlx_rate:.1f} GFLOP/s, numpy {np_rate:.1f} GFLOP/s "
        "(the encoder runs on MLX: on Apple silicon, on its GPU).\n\n"
    )
    return note + table(results, n)


def _wait_ready(url: str, procs: Procs) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        procs.check()
        _, body, _ = request_json("GET", url + "/models")
        for m in body.get("models", []):
            if m["model_id"] == MODEL and m["state"] == "ready":
                return int(m["port"])
            if m["model_id"] == MODEL and m["state"] == "failed":
                raise RuntimeError(f"load failed: {m['error']}")
        time.sleep(0.2)
    raise RuntimeError(f"{MODEL} not ready within 120 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.embeddings",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the tiny demo encoder")
    p.add_argument("--inputs", type=int, default=64, help="texts per arm (N)")
    p.add_argument("--concurrency", type=int, default=8, help="requests at once (C)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = p.parse_args(argv)
    body = run(args.quick, args.inputs, args.concurrency)
    print(body)
    if not args.no_write:
        cmd = "python -m bench.embeddings" + (" --quick" if args.quick else "")
        benchmarks_md.update("bench-embeddings", cmd, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
