"""Seconds a draining neuron's stream lives through cortex (issue 19's drain row).

`python -m bench.drain [--tokens 3000]`

Two neurons, `a` (drain_s 60) and `b`, each serving the demo model, behind one
cortex. A streamed chat request of `--tokens` tokens, pinned to `a`, runs free;
after its first token `a` gets SIGTERM, and meanwhile a request is sent through
cortex every 0.2 s. Printed: how long the stream lived after the signal and how it
ended (complete, or the error frame), when cortex showed `a` draining, the new
requests' answers, and when `a` exited. Then the same for cortex's own SIGTERM:
its /health and a new request during its drain, the stream's end, its exit.

Before issue 19 the neuron closed its listener on SIGTERM: cortex saw three
refused polls and ended the stream at 2-3 s with "replica a was lost".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from neuron.store.demo_model import build_demo_model
from tests.conftest import TEST_ROOT, NeuronProcess, stop_quietly
from tests.e2e.conftest import CortexProcess

MODEL = "demo"


def _body(tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": tokens,
        "logit_bias": {"1": -100},
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


async def _get(s: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with s.get(url) as r:
        return r.status, json.loads(await r.read() or b"null")


def _ending(text: bytes) -> str:
    """How a stream ended: complete with its token count, or its error's message."""
    for line in reversed(text.split(b"\n")):
        if line.startswith(b"data: {"):
            frame = json.loads(line[6:])
            if "error" in frame:
                return f"error: {frame['error']['message'][:100]}"
            if frame.get("usage"):
                return f"complete, {frame['usage']['completion_tokens']} tokens"
    return "ended without usage or error"


async def _stream_through(
    s: aiohttp.ClientSession, url: str, tokens: int, node: str | None, signal_it: Any
) -> tuple[float, str]:
    """Stream, signal after the first token; (seconds it lived after the signal, its end)."""
    headers = {"X-Cortex-Node": node} if node else {}
    async with s.post(url + "/v1/chat/completions", json=_body(tokens), headers=headers) as r:
        text = b""
        while b'"content"' not in text:
            text += await r.content.readany()
        t0 = time.monotonic()
        signal_it()
        while chunk := await r.content.readany():
            text += chunk
    return time.monotonic() - t0, _ending(text)


async def _asker(
    s: aiohttp.ClientSession, url: str, answers: Counter[str], *, once: bool = False
) -> None:
    """A one-piece request every 0.2 s; its status (code, Retry-After) counted."""
    while True:
        try:
            async with s.post(url + "/v1/chat/completions", json=_body(4, False)) as r:
                body = json.loads(await r.read() or b"null")
                code = body.get("error", {}).get("code") if r.status != 200 else None
                wait = r.headers.get("Retry-After")
                answers[f"{r.status}" + (f" {code} Retry-After {wait}" if code else "")] += 1
        except aiohttp.ClientError as exc:
            answers[type(exc).__name__] += 1
        if once:
            return
        await asyncio.sleep(0.2)


async def neuron_case(c: CortexProcess, a: NeuronProcess, tokens: int) -> None:
    answers: Counter[str] = Counter()
    seen: list[float] = []
    async with aiohttp.ClientSession() as s:

        async def watch(t0: list[float]) -> None:
            while not seen:
                _, state = await _get(s, c.url + "/admin/state")
                node = next(n for n in state["nodes"] if n["name"] == "a")
                if node.get("draining") and t0:
                    seen.append(time.monotonic() - t0[0])
                await asyncio.sleep(0.05)

        signalled: list[float] = []

        def sigterm() -> None:
            signalled.append(time.monotonic())
            a.process.send_signal(signal.SIGTERM)

        tasks = [
            asyncio.create_task(watch(signalled)),
            asyncio.create_task(_asker(s, c.url, answers)),
        ]
        lived, ending = await _stream_through(s, c.url, tokens, "a", sigterm)
        ended = time.monotonic()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    code = await asyncio.to_thread(a.process.wait, 120)
    print(f"neuron a SIGTERM, {tokens}-token stream through cortex pinned to a:")
    print(f"  stream lived {lived:.2f} s after the signal: {ending}")
    print(f"  cortex showed a draining after {seen[0]:.2f} s" if seen else "  never draining")
    print(f"  requests meanwhile (every 0.2 s): {dict(answers)}")
    print(f"  a exited (code {code}) {time.monotonic() - ended:.2f} s after the stream ended")


async def cortex_case(c: CortexProcess, tokens: int) -> None:
    assert c.process is not None
    process = c.process
    async with aiohttp.ClientSession() as s:
        during: list[str] = []

        def sigterm() -> None:
            process.send_signal(signal.SIGTERM)

        async def probe() -> None:
            await asyncio.sleep(0.3)
            try:
                status, body = await _get(s, c.url + "/health")
                during.append(f"/health {status} {body.get('error', {}).get('code', '')}")
            except aiohttp.ClientError as exc:  # a closed listener (before issue 19)
                during.append(f"/health {type(exc).__name__}")
            answers: Counter[str] = Counter()
            await asyncio.wait_for(_asker(s, c.url, answers, once=True), 60)
            during.append(f"new request {', '.join(answers)}")

        task = asyncio.create_task(probe())
        lived, ending = await _stream_through(s, c.url, tokens, None, sigterm)
        ended = time.monotonic()
        await task
    code = await asyncio.to_thread(process.wait, 120)
    print(f"cortex SIGTERM, {tokens}-token stream through it:")
    print(f"  stream lived {lived:.2f} s after the signal: {ending}")
    print(f"  during the drain: {'; '.join(during)}")
    print(f"  cortex exited (code {code}) {time.monotonic() - ended:.2f} s after the stream ended")


async def main(tokens: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-drain-"))
    TEST_ROOT[:] = [root]
    model = build_demo_model(root / "demo")
    load = [{"model_id": MODEL, "source": str(model)}]
    a = NeuronProcess.start(root / "a", {"drain_s": 60.0, "load": load})
    b = NeuronProcess.start(root / "b", {"load": load})
    catalogue = [{"id": MODEL, "source": str(model)}]
    c = CortexProcess.write(root / "cortex", [("a", a), ("b", b)], catalogue, drain_s=60.0)
    try:
        c.start()
        for n in (a, b):
            n.wait_state(MODEL, "ready")
        await asyncio.sleep(1.5)  # a few polls: cortex sees both replicas ready
        await neuron_case(c, a, tokens)
        await cortex_case(c, tokens)
    finally:
        for n in (a, b):
            stop_quietly(n)
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=3000, help="the stream's max_tokens")
    asyncio.run(main(parser.parse_args().tokens))
    sys.exit(0)
