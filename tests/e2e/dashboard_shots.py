"""Screenshots of the dashboard under load, taken by hand (not a test).

    cortex fleet --dir /tmp/shots --nodes 2 --port 9460 --neuron-port 9461 &
    python -m tests.e2e.dashboard_shots --url http://127.0.0.1:9460 --out /work

Streams a steady load through cortex for `--seconds` (the demo model on every
node, and the real model), then opens the page in headless Chromium and saves
charts.png (the charts after that load), stops the load, and saves playground.png
(the real model's answer mid-stream in the playground, alone on the CPU). Prints
what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.chromium import Browser

PROMPTS = [
    "Explain what a gateway in front of several inference servers does.",
    "Write three sentences about running language models on small computers.",
    "What is the capital of France, and why is it famous?",
    "Give two tips for measuring the speed of a text generator.",
]
QUESTION = "In a few sentences: why would one run several small language model servers?"


async def _stream(session: aiohttp.ClientSession, url: str, model: str, n: int, i: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": n,
        "stream": True,
    }
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            await asyncio.sleep(1)
            return 0
        frames = 0
        async for line in r.content:
            frames += line.startswith(b"data: {")
        return frames


async def _load(url: str, seconds: float, tally: dict[str, int]) -> None:
    """Two streams of the demo model and one of the real one, again and again."""
    deadline = time.monotonic() + seconds

    async def loop(model: str, n: int, k: int) -> None:
        i = k
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                tally[model] = tally.get(model, 0) + await _stream(s, url, model, n, i)
                i += 1
                await asyncio.sleep(0.3)

    await asyncio.gather(loop("demo", 300, 0), loop("demo", 120, 1), loop("smollm2-135m", 48, 2))


async def _shots(url: str, out: Path, seconds: float) -> None:
    tally: dict[str, int] = {}
    started = time.monotonic()
    load = asyncio.create_task(_load(url, seconds + 30, tally))
    await asyncio.sleep(seconds)
    async with Browser.open(width=1400, height=1100) as b:
        await b.goto(url + "/dashboard")
        await b.wait_js("document.body.dataset.live === 'yes'", what="the first update")
        await b.js("document.querySelector('#charts-span').parentElement.scrollIntoView()")
        await b.js("window.scrollBy(0, -12)")
        await asyncio.sleep(0.5)
        await b.screenshot(out / "charts.png")
        points = await b.js("document.querySelector('#charts-source').textContent")
        print(f"charts.png after {time.monotonic() - started:.0f} s of load: {points}")
        # The playground's answer alone on the CPU: its TTFT and tok/s are the model's own.
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        await asyncio.sleep(10)

        await b.wait_js(
            "[...document.querySelectorAll('#pg-model option')].some((o) => o.value === "
            "'smollm2-135m')",
            what="the real model in the playground",
        )
        await b.js("document.querySelector('#pg-model').value = 'smollm2-135m'")
        await b.js("document.querySelector('#pg-max').value = '200'")
        await b.type_into("#pg-prompt", QUESTION)
        await b.js("document.querySelector('#pg').scrollIntoView({block: 'center'})")
        await b.click("#pg-send")
        stats = await b.wait_js(
            "document.querySelector('#pg-stats').dataset.state === 'streaming'"
            " && Number(document.querySelector('#pg-stats').dataset.tokens) >= 24"
            " && JSON.stringify(document.querySelector('#pg-stats').dataset)",
            within_s=120,
            what="the real model's answer under way",
        )
        await b.screenshot(out / "playground.png")
        print(f"playground.png mid-stream: {json.loads(stats)}")
        print(f"problems in the page: {b.problems}")
    print(f"load streamed (frames per model): {tally}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:9400", help="cortex's base URL")
    p.add_argument("--out", type=Path, default=Path("."), help="where the PNGs go")
    p.add_argument("--seconds", type=float, default=70.0, help="load before the charts shot")
    args: Any = p.parse_args(argv)
    asyncio.run(_shots(args.url.rstrip("/"), args.out, args.seconds))


if __name__ == "__main__":
    main()
