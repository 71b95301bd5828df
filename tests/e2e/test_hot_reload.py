"""Hot reload of cortex's catalogue under load: no stream cut, every change served.

Real neurons and runners on the demo model, a real `cortex serve` with
`watch_config = true`: the catalogue file is edited while 32 streams are open
(a model gained, one lost, a pin moved), then broken, then fixed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from tests.conftest import wait_until
from tests.e2e.conftest import CortexProcess
from tests.support.clients import chat
from tests.support.waiting import until

STREAM: dict[str, Any] = {"max_tokens": 96, "logit_bias": {"1": -100}, "stream": True}


def _write(c: CortexProcess, models: list[dict[str, Any]]) -> float:
    """Replace the catalogue as an editor saving by rename would; when it was written."""
    tmp = c.dir / "models.toml.new"
    tmp.write_text(tomli_w.dumps({"models": models}))
    os.replace(tmp, c.dir / "models.toml")
    return time.monotonic()


def _listed(c: CortexProcess) -> set[str]:
    return {m["id"] for m in c.get("/v1/models")[1]["data"]}


def _on(c: CortexProcess, model_id: str) -> dict[str, str]:
    """node -> state of model_id there, as cortex sees it."""
    state = c.get("/admin/state")[1]
    return {
        n["name"]: m["state"]
        for n in state["nodes"]
        for m in n["models"]
        if m["model_id"] == model_id
    }


async def _stream(s: aiohttp.ClientSession, url: str, model: str, i: int, opened: list[int]) -> str:
    async with s.post(url, json=chat(model, text=f"stream {i}", **STREAM)) as r:
        opened.append(r.status)
        return (await r.read()).decode()


async def test_catalogue_edits_under_load_cut_no_stream(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> None:
    a, b = neuron_factory(name="a"), neuron_factory(name="b")
    m1, m2, m3 = (f"{model_id}-{n}" for n in ("pinned", "removed", "added"))
    src = str(demo_model)
    before = [
        {"id": m1, "source": src, "pinned_on": ["a"]},
        {"id": m2, "source": src, "keep_loaded": True},
    ]
    c = cortex_factory([("a", a), ("b", b)], before, watch_config=True)
    wait_until(lambda: "ready" in _on(c, m1).values(), 120, f"{m1} ready")
    wait_until(lambda: "ready" in _on(c, m2).values(), 120, f"{m2} ready")

    url = c.url + "/v1/chat/completions"
    opened: list[int] = []
    after: list[dict[str, Any]] = [
        {"id": m1, "source": src, "pinned_on": ["b"]},
        {"id": m3, "source": src},
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        streams = [
            asyncio.ensure_future(_stream(s, url, m, i, opened))
            for i, m in enumerate([m1, m2] * 16)
        ]
        await until(lambda: len(opened) == 32, timeout=60, interval=0.05, what="32 streams open")
        written = _write(c, after)
        await asyncio.to_thread(
            wait_until, lambda: m3 in _listed(c) and m2 not in _listed(c), 30, "the edit served"
        )
        visible = time.monotonic() - written
        bodies = await asyncio.gather(*streams)
    assert opened == [200] * 32
    cut = [b[-300:] for b in bodies if '"error"' in b or not b.rstrip().endswith("data: [DONE]")]
    assert not cut, f"{len(cut)} stream(s) cut by the reload: {cut[:2]}"

    # The removed model is refused (permanent) and unloaded once its streams ended; the
    # added one is served; the moved pin converges.
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=chat(m2, text="hi", max_tokens=2)) as r:
            assert r.status == 404, await r.text()
            assert "removed from the catalogue" in (await r.json())["error"]["message"]
        async with s.post(url, json=chat(m3, text="hi", max_tokens=2)) as r:
            assert r.status in (200, 503), await r.text()
    wait_until(lambda: not _on(c, m2), 60, f"{m2} unloaded everywhere")
    wait_until(lambda: _on(c, m1).get("b") == "ready", 120, f"{m1} loaded on b")

    # A broken edit is refused: the running catalogue stays and says why.
    (c.dir / "models.toml").write_text("[[models]]\nid = \n")
    problem = wait_until(lambda: c.get("/admin/state")[1]["config"]["problem"], 30, "refusal")
    assert "models.toml" in problem["detail"]
    assert m3 in _listed(c) and m1 in _listed(c)
    doctor = c.get("/admin/doctor")[1]
    assert any(ch["name"] == "config reload" and ch["verdict"] == "fail" for ch in doctor["checks"])
    _write(c, after)
    wait_until(lambda: c.get("/admin/state")[1]["config"]["problem"] is None, 30, "fixed")

    # SIGHUP reloads too (and names what only a restart applies).
    reloads = c.get("/admin/state")[1]["config"]["reloads"]
    config = (
        (c.dir / "cortex.toml")
        .read_text()
        .replace("poll_interval_s = 0.5", "poll_interval_s = 0.4")
    )
    (c.dir / "cortex.toml").write_text(config)
    assert c.process is not None
    c.process.send_signal(signal.SIGHUP)
    last = wait_until(
        lambda: (st := c.get("/admin/state")[1]["config"])["reloads"] > reloads and st["last"],
        30,
        "the SIGHUP reload",
    )
    assert "poll_interval_s" in json.dumps(last["restart_keys"])
    print(f"hot reload: 32 streams, none cut; the edit visible in /v1/models {visible:.2f} s after")
