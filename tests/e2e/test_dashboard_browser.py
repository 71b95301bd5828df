"""The live dashboard in headless Chromium, against a real cortex and a real neuron.

The browser is driven over the DevTools protocol (tests/support/chromium.py):
the operator types the admin token, the page fills in from /admin/state, a
click loads and unloads the demo model, and nothing in the page logs an error.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import NeuronProcess, wait_until
from tests.e2e.conftest import CortexProcess
from tests.support import chromium
from tests.support.chromium import Browser
from tests.support.waiting import until

pytestmark = pytest.mark.skipif(chromium.missing() is not None, reason=str(chromium.missing()))

TOKEN = "dash-admin-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LEAD_COPY = Path("/work/dash-screenshot.png")
READY_S = 120.0
# A history point a second (the charts, the sparkline), so they fill within a test;
# the default is one every 5 s.
FAST_HISTORY = {"history_step_s": 1.0, "history_span_s": 120.0}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        headers=AUTH, timeout=aiohttp.ClientTimeout(total=60)
    ) as session:
        yield session


async def _state(http: aiohttp.ClientSession, c: CortexProcess) -> dict[str, Any]:
    async with http.get(c.url + "/admin/state") as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


def _model(state: dict[str, Any], model_id: str) -> dict[str, Any]:
    (m,) = [m for m in state["models"] if m["id"] == model_id]
    return dict(m)


def _fleet(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str, **settings: Any
) -> CortexProcess:
    a: NeuronProcess = neuron_factory(name="a")
    c: CortexProcess = cortex_factory(
        [("a", a)], [{"id": model_id, "source": str(demo_model)}], admin_token=TOKEN, **settings
    )
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 1, 30, "node a healthy")
    return c


async def _sign_in(b: Browser, c: CortexProcess, model_id: str) -> None:
    """Open the page, which asks for the token and fetches nothing; type it in."""
    await b.goto(c.url + "/dashboard")
    banner = await b.wait_js("document.querySelector('#banner.show')?.textContent", what="banner")
    assert "admin token" in banner
    assert await b.js("document.querySelectorAll('[data-node]').length") == 0
    await b.type_into("#token", TOKEN)
    await b.click("#token-save")
    await b.wait_js(
        'document.querySelector(\'.card[data-node="a"][data-healthy="yes"]\') !== null',
        what="node a's card, healthy",
    )
    await b.wait_js(f"document.querySelector('tr[data-model={json.dumps(model_id)}]') !== null")
    # The token lives in this tab's sessionStorage, never in the page or its URL.
    assert await b.js("sessionStorage.getItem('cortex-admin-token')") == TOKEN
    assert TOKEN not in await b.js("document.documentElement.outerHTML + location.href")


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


async def test_dashboard_live_data_actions_and_no_console_errors(
    neuron_factory: Any,
    cortex_factory: Any,
    demo_model: Path,
    model_id: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    c = _fleet(neuron_factory, cortex_factory, demo_model, model_id, **FAST_HISTORY)
    row = f"tr[data-model={json.dumps(model_id)}]"
    async with Browser.open() as b:
        await _sign_in(b, c, model_id)
        assert await b.js(f"document.querySelector('{row} td:nth-child(3)').dataset.state") == (
            "nowhere"
        )

        # Load by a click: the page and /admin/state both see it ready on a.
        await b.click(f"{row} button[data-action='load']")
        await b.wait_js(
            f"document.querySelector('{row} td:nth-child(3)').dataset.state === 'ready'",
            within_s=READY_S,
            what="the page to show the model ready",
        )
        assert await b.js("document.querySelector('#result').dataset.outcome") == "ok"
        placements = _model(await _state(http, c), model_id)["placements"]
        assert [(p["node"], p["state"]) for p in placements] == [("a", "ready")]
        card = ".card[data-node='a']"
        assert await b.wait_js(
            f"document.querySelector(\"{card} li[data-model='{model_id}']\") !== null"
        )

        # A request through cortex: the neuron's token counter reaches /admin/state,
        # cortex's history turns its growth into a tok/s point, the sparkline draws it.
        async with http.post(
            c.url + "/v1/chat/completions",
            json={
                "model": model_id,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 24,
                "logit_bias": {"1": -100},
            },
        ) as r:
            assert r.status == 200, await r.text()
            completion = (await r.json())["usage"]["completion_tokens"]
        assert completion > 0

        counters: dict[str, Any] = {}

        async def counted() -> bool:
            nonlocal counters
            node = (await _state(http, c))["nodes"][0]
            counters = {m["model_id"]: m["completion_tokens"] for m in node["models"]}
            return any(
                m["model_id"] == model_id and m["completion_tokens"] == completion
                for m in node["models"]
            )

        await until(
            counted,
            timeout=30,
            interval=0.1,
            what=f"the completion-token counter ({completion}) to reach /admin/state",
            seen=lambda: counters,
        )
        peak = await b.wait_js(
            f'Number(document.querySelector("{card} svg.spark").dataset.max) > 0'
            f' && document.querySelector("{card} svg.spark").dataset.max',
            what="a tok/s sample above zero",
        )
        assert float(peak) > 0
        phase = await b.js(f'document.querySelector("{card} [data-phase]").dataset.phase')
        assert phase in ("idle", "prefill", "decode")
        mem = await b.js(f'document.querySelector("{card} .bar.mem > div").style.width')
        assert mem.endswith("%") and 0 < float(mem[:-1]) <= 100

        shot = await b.screenshot(tmp_path / "dashboard.png")
        width, height = _png_size(shot)
        assert (width, height) == (1400, 1100)
        assert len(shot) > 20_000, "a blank page compresses to almost nothing"
        shutil.copyfile(tmp_path / "dashboard.png", LEAD_COPY)
        text = await b.js("document.body.innerText")
        assert model_id in text and "1/1 nodes healthy" in text

        # Unload by a click: gone from the page and from /admin/state.
        await b.click(f"{row} button[data-action='unload']")
        await b.wait_js(
            f"document.querySelector('{row} td:nth-child(3)').dataset.state === 'nowhere'",
            within_s=60,
            what="the page to show the model unloaded",
        )
        assert _model(await _state(http, c), model_id)["placements"] == []
        assert "unloaded from a" in await b.js("document.querySelector('#result').textContent")
        problems = list(b.problems)
    assert problems == [], problems


async def test_dashboard_events_and_the_trace_of_a_clicked_request(
    neuron_factory: Any,
    cortex_factory: Any,
    demo_model: Path,
    model_id: str,
    http: aiohttp.ClientSession,
) -> None:
    c = _fleet(neuron_factory, cortex_factory, demo_model, model_id)
    async with http.post(c.url + f"/admin/models/{model_id}/load") as r:
        assert r.status in (200, 202), await r.text()
    async with Browser.open() as b:
        await _sign_in(b, c, model_id)
        assert await b.js("document.body.dataset.events") == "1"
        async with http.post(
            c.url + "/v1/chat/completions",
            json={
                "model": model_id,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": 8,
            },
        ) as r:
            assert r.status == 200
            await r.read()
        tid = await b.wait_js(
            "[...document.querySelectorAll('#traces tr[data-trace]')]"
            f".find((tr) => tr.textContent.includes({json.dumps(model_id)}))?.dataset.trace",
            within_s=60,
            what="the request in the traces table",
        )
        await b.click(f'#traces tr[data-trace="{tid}"]')
        shown = await b.wait_js(
            f"document.querySelector('#trace').dataset.trace === {json.dumps(tid)}"
            " && document.querySelector('#trace').textContent",
            what="the clicked request's trace",
        )
        trace = json.loads(shown)
        assert trace["id"] == tid and "cortex" in trace and "neuron" in trace
        await b.wait_js(
            "document.querySelectorAll('#events tr[data-kind]').length > 0",
            what="an event in the events table",
        )
        assert await b.js("document.querySelector('#events-source').textContent") == (
            "from /admin/events"
        )
        problems = list(b.problems)
    assert problems == [], problems


API_KEY = "sk-dash-playground-1"
PG_STATE = "document.querySelector('#pg-stats').dataset.state"
REQUEST_SHOWN = "(document.querySelector('#pg-stats [data-stat=request] b')?.textContent || '')"
NO_RATE = "\N{EN DASH}"  # what the page shows for a rate it will not compute


async def _play(b: Browser, model_id: str, prompt: str) -> dict[str, Any]:
    """Pick the model, type the prompt, send it, and wait for the answer's end."""
    await b.wait_js(
        f"[...document.querySelectorAll('#pg-model option')].some((o) => o.value === "
        f"{json.dumps(model_id)})",
        what="the model in the playground's list",
    )
    await b.js(f"document.querySelector('#pg-model').value = {json.dumps(model_id)}")
    await b.js("document.querySelector('#pg-prompt').value = ''")
    await b.type_into("#pg-prompt", prompt)
    before = await b.js(REQUEST_SHOWN)
    await b.click("#pg-send")
    await b.wait_js(
        f"['done', 'failed', 'stopped'].includes({PG_STATE})"
        f" && {REQUEST_SHOWN} !== {json.dumps(before)}",
        what="this answer's end",
    )
    stats: dict[str, Any] = await b.js(
        "(() => { const s = document.querySelector('#pg-stats');"
        " return Object.assign({ answer: document.querySelector('#pg-answer').textContent,"
        " note: document.querySelector('#pg-note').textContent,"
        f" request: {REQUEST_SHOWN} }}, s.dataset); }})()"
    )
    return stats


async def test_playground_streams_with_the_admin_token_and_an_api_key_and_charts_fill(
    neuron_factory: Any,
    cortex_factory: Any,
    demo_model: Path,
    model_id: str,
    http: aiohttp.ClientSession,
) -> None:
    """The playground streams an answer (TTFT, tokens, tok/s, the request's trace a click
    away) signed in with the admin token on a cortex with API keys, and with an API key;
    the charts and the node's sparkline fill from cortex's history, already drawn on a
    page opened afresh; the requests table shows no rate for an answer that came at once."""
    c = _fleet(
        neuron_factory,
        cortex_factory,
        demo_model,
        model_id,
        api_keys=[{"key": API_KEY, "models": [model_id]}],
        **FAST_HISTORY,
    )
    async with http.post(c.url + f"/admin/models/{model_id}/load") as r:
        assert r.status in (200, 202), await r.text()
    async with Browser.open() as b:
        await _sign_in(b, c, model_id)
        assert await b.js("document.body.dataset.keys") == "1"
        await b.wait_js(
            f"document.querySelector('tr[data-model={json.dumps(model_id)}] td:nth-child(3)')"
            ".dataset.state === 'ready'",
            within_s=READY_S,
            what="the model ready",
        )
        await b.js("document.querySelector('#pg-max').value = '160'")
        first = await _play(b, model_id, "Tell me about the fleet.")
        print(f"\nplayground, admin token: {first}")
        assert first["state"] == "done", first
        assert float(first["ttft"]) > 0 and int(first["tokens"]) > 0
        assert first["tps"] == "" or float(first["tps"]) > 0
        rid = first["request"]
        assert rid and len(rid) >= 8

        # Its trace, one click away: cortex's and the neuron's view of this request.
        await b.click("#pg-trace-open")
        shown = await b.wait_js(
            f"document.querySelector('#pg-trace').dataset.trace === {json.dumps(rid)}"
            " && document.querySelector('#pg-trace').textContent",
            what="the playground request's trace",
        )
        trace = json.loads(shown)
        assert trace["cortex"]["stream"] is True and trace["cortex"]["model"] == model_id
        assert trace["cortex"]["completion_tokens"] == int(first["tokens"])
        assert trace["neuron"]["id"] == rid

        # An API key alone (the admin token forgotten): the answer streams all the same,
        # and the trace says it needs the admin token instead of failing.
        await b.click("#token-forget")
        await b.type_into("#pg-key", API_KEY)
        await b.click("#pg-key-save")
        second = await _play(b, model_id, "And again.")
        print(f"playground, API key: {second}")
        assert second["state"] == "done" and int(second["tokens"]) > 0, second
        assert await b.js("document.querySelector('#pg-trace-open')") is None
        assert "needs the admin token" in await b.js(
            "document.querySelector('#pg-stats').textContent"
        )
        assert API_KEY not in await b.js("document.documentElement.outerHTML + location.href")

        # An unstreamed answer: tokens, but no rate over the few ms it took to arrive.
        async with http.post(
            c.url + "/v1/chat/completions",
            json={
                "model": model_id,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 64,
                "logit_bias": {"1": -100},
            },
        ) as r:
            assert r.status == 200, await r.text()
            unstreamed = r.headers["X-Request-Id"]

        # Signed in again: a page opened afresh draws the kept history at once.
        await b.type_into("#token", TOKEN)
        await b.click("#token-save")
        await b.goto(c.url + "/dashboard")
        await b.wait_js("document.body.dataset.live === 'yes'", what="the first update")
        fresh = await b.js(
            "Number(document.querySelector('#charts [data-chart=tok_s]').dataset.points)"
        )
        assert fresh > 1, "a freshly opened page starts with the kept points"
        spark = ".card[data-node='a'] svg.spark"
        peak = await b.wait_js(
            f'Number(document.querySelector("{spark}").dataset.max) > 0'
            f' && document.querySelector("{spark}").dataset.max',
            what="the node's tok/s sparkline above zero",
        )
        await b.wait_js(
            "Number(document.querySelector('#charts [data-chart=ttft]').dataset.points) > 0",
            what="TTFT points",
        )
        charts = await b.js(
            "Object.fromEntries([...document.querySelectorAll('#charts .chart')].map((c) =>"
            " [c.dataset.chart, [Number(c.dataset.series), Number(c.dataset.points),"
            " c.querySelector('.legend').textContent]]))"
        )
        print(f"per node, a point a second: {charts}; sparkline peak {peak} tok/s")
        assert set(charts) == {"tok_s", "ttft", "load", "memory"}
        axis = await b.js(
            "[...document.querySelectorAll('#charts [data-chart=memory] svg text')]"
            ".map((t) => t.textContent)"
        )
        ys = [float(v) for v in axis[:3]]  # numbers, 0 at the bottom, the top last
        assert ys[0] == 0 < ys[1] < ys[2] and axis[-1] == "now", axis
        assert all(series == 1 and points > 0 for series, points, _ in charts.values())
        await b.click("#by-models")
        legend = await b.wait_js(
            "document.querySelector('#charts').dataset.by === 'models'"
            " && document.querySelector('#charts [data-chart=tok_s] .legend').textContent",
            what="the charts per model",
        )
        assert model_id in legend

        row = f'#traces tr[data-trace="{unstreamed}"]'
        cols = await b.wait_js(
            f"document.querySelector('{row}') && [...document.querySelectorAll('{row} td')]"
            ".map((td) => td.textContent)",
            what="the unstreamed request in the table",
        )
        heads = await b.js(
            "[...document.querySelectorAll('#traces th')].map((th) => th.textContent)"
        )
        print(f"requests table: {heads} / {cols}")
        assert heads[-3:] == ["tokens in", "tokens out", "decode tok/s"]
        assert int(cols[-2]) > 1 and cols[-1] == NO_RATE
        problems = list(b.problems)
    assert problems == [], problems
