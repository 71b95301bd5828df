"""The CPU of a runner after its client left, each second for ten seconds.

`python -m bench.abandon`

One neuron with the demo model (its context raised to 1M tokens so a prompt
can be long), then two requests straight to the neuron, each abandoned by its
client after 3 s: a non-streamed `max_tokens` 1e9 generation (decode), and the
non-streamed prefill of a 150k-word prompt. A runner that keeps working after
its client left shows about 1.0 (one core) every second; one that stops, 0.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import cpu_seconds
from neuron.store.demo_model import build_demo_model
from tests.conftest import NeuronProcess, runner_pids, stop_quietly


async def case(n: NeuronProcess, pid: int, name: str, body: dict[str, Any]) -> None:
    async def send() -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.post(n.url + "/v1/completions", json=body) as r,
        ):
            await r.read()

    task = asyncio.create_task(send())
    await asyncio.sleep(3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    shares = []
    for _ in range(10):
        c0 = cpu_seconds(pid)
        await asyncio.sleep(1)
        shares.append(cpu_seconds(pid) - c0)
    cores = " ".join(f"{x:.2f}" for x in shares)
    print(f"{name:44s} runner cores, each second after the client left: {cores}", flush=True)


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-abandon-"))
    model = build_demo_model(root / "demo")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 10**6}))
    n = NeuronProcess.start(root / "n", {"model_roots": [str(root)]})
    try:
        n.load_ready("big", model)
        (pid,) = runner_pids("big")
        long_gen = {"prompt": "Once", "max_tokens": 10**9, "logit_bias": {"1": -100}}
        await case(n, pid, "non-streamed decode, max_tokens 1e9", {"model": "big", **long_gen})
        await asyncio.sleep(5)
        prompt = " ".join(f"w{i % 997}" for i in range(150_000))
        await case(
            n,
            pid,
            "non-streamed prefill, 150k-word prompt",
            {"model": "big", "prompt": prompt, "max_tokens": 1},
        )
    finally:
        stop_quietly(n)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
