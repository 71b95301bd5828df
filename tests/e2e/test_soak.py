"""`make soak`: minutes of mixed, partly hostile traffic through a real fleet.

Not part of `make test` (marker `soak`). Workers loop until SOAK_S seconds
(default 180) have passed, each request drawn in turn from: a full stream, a
one-piece answer, a stream the client leaves after its first token, a
one-piece request the client leaves at once, poison fields, a prompt over the
context. Afterwards nothing may have broken: no runner restarted, no 5xx, no
stream error, and file descriptors and memory of every service flat.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import LONG_STREAM, NeuronProcess, runner_pids, wait_until
from tests.e2e.conftest import CortexProcess

pytestmark = pytest.mark.soak

SOAK_S = float(os.environ.get("SOAK_S", "180"))
WORKERS = 8
# Fields that broke runners, and what each must get: a 400 naming it, or (paths
# the runner would open) dropped before the runner, so an ordinary answer.
POISON: list[tuple[dict[str, Any], int]] = [
    ({"stop": [123]}, 400),
    ({"logit_bias": {"99999999": 5}}, 400),
    ({"draft_model": "/etc"}, 200),
    ({"adapters": "/tmp"}, 200),
    ({"max_tokens": "many"}, 400),
]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _one(s: aiohttp.ClientSession, url: str, kind: str, n: int) -> str:
    chat = {"model": "soak", "messages": [{"role": "user", "content": f"hello {n}"}]}
    if kind == "stream":
        async with s.post(url, json={**chat, "stream": True, "max_tokens": 24}) as r:
            body = await r.read()
            ok = r.status == 200 and body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
            return "ok" if ok else f"bad stream {r.status}: {body[-200:]!r}"
    if kind == "unary":
        async with s.post(url, json={**chat, "max_tokens": 24}) as r:
            await r.read()
            return "ok" if r.status == 200 else f"bad unary {r.status}"
    if kind == "leave_stream":
        async with s.post(url, json={**chat, "stream": True, **LONG_STREAM}) as r:
            await r.content.readany()
            r.close()
            return "ok"
    if kind == "leave_unary":
        task = asyncio.ensure_future(s.post(url, json={**chat, **LONG_STREAM}))
        await asyncio.sleep(0.3)
        task.cancel()
        return "ok"
    if kind == "poison":
        field, want = POISON[n % len(POISON)]
        async with s.post(url, json={**chat, "max_tokens": 8, **field}) as r:
            await r.read()
            return "ok" if r.status == want else f"{field} answered {r.status}"
    # A prompt far over the context limit.
    huge = {**chat, "messages": [{"role": "user", "content": "word " * 40000}]}
    async with s.post(url, json=huge) as r:
        await r.read()
        return "ok" if r.status == 400 else f"huge prompt answered {r.status}"


async def test_soak(
    neuron_factory: Callable[..., NeuronProcess],
    cortex_factory: Callable[..., CortexProcess],
    demo_model: Path,
) -> None:
    """Mixed hostile traffic for SOAK_S seconds breaks nothing and leaks nothing."""
    a, b = neuron_factory(name="a"), neuron_factory(name="b")
    spec = {"id": "soak", "source": str(demo_model), "replicas": 2, "keep_loaded": True}
    c = cortex_factory([("a", a), ("b", b)], [spec])
    wait_until(lambda: len(runner_pids("soak")) == 2, what="both replicas")
    wait_until(
        lambda: sum(loc["state"] == "ready" for loc in c.model("soak")["locations"]) == 2,
        what="both replicas ready in cortex",
    )
    runners = sorted(runner_pids("soak"))
    services = [a.process.pid, b.process.pid, c.process.pid]  # type: ignore[union-attr]
    kinds = itertools.cycle(
        ["stream", "unary", "leave_stream", "stream", "poison", "leave_unary", "huge", "unary"]
    )
    outcomes: Counter[str] = Counter()
    url = c.url + "/v1/chat/completions"
    deadline = time.monotonic() + SOAK_S
    counter = itertools.count()
    warm_at = time.monotonic() + min(30.0, SOAK_S / 4)
    base: dict[int, tuple[int, int]] = {}

    async def worker() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            while time.monotonic() < deadline:
                n = next(counter)
                outcomes[await _one(s, url, next(kinds), n)] += 1
                if not base and time.monotonic() > warm_at:
                    base.update({p: (_fds(p), _rss(p)) for p in services})

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    await asyncio.sleep(3)  # abandoned work winds down

    bad = {k: v for k, v in outcomes.items() if k != "ok"}
    assert not bad, bad
    assert sorted(runner_pids("soak")) == runners, "a runner was restarted"
    async with aiohttp.ClientSession() as s, s.get(c.url + "/metrics") as r:
        metrics = await r.text()
    server_errors = [
        line
        for line in metrics.splitlines()
        if line.startswith(("cortex_requests_total{", "cortex_stream_errors_total{"))
        and ('code="5' in line or line.startswith("cortex_stream_errors"))
        and float(line.rsplit(" ", 1)[1]) > 0
    ]
    assert not server_errors, server_errors
    for p, (fds, rss) in base.items():
        assert _fds(p) <= fds + 16, f"pid {p}: fds {fds} -> {_fds(p)}"
        assert _rss(p) <= rss * 1.5 + 64 * 2**20, f"pid {p}: rss {rss} -> {_rss(p)}"
    print(f"\nsoak: {sum(outcomes.values())} requests in {SOAK_S:.0f} s, all as expected")
