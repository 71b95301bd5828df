"""GET /dashboard: an open page without data, whose data stays behind the admin token;
and the page itself in headless Chromium against fake neurons (hostile names, a
node down, a stage under way)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator

import pytest

from cortex.run.poller import POLLER
from shared.catalogue import ModelSpec
from tests.cortex.fakes import FakeNeuron, catalogue, fleet, gateway, stop_all
from tests.cortex.test_staging_view import HOSTILE_ERROR, _job
from tests.support import chromium
from tests.support.chromium import Browser

HOSTILE_NODE = "<script>window.__pwned = 'node'</script>"
HOSTILE_MODEL = 'm"><img src=x onerror="window.__pwned = 1">'


@pytest.fixture
async def up_and_down() -> AsyncIterator[list[FakeNeuron]]:
    """Two nodes: "n-up" serves m1, stages m2 and serves one oddly named model;
    the other (with a hostile name) is down."""
    nodes = await fleet("n-up", HOSTILE_NODE)
    up, down = nodes
    up.add_model("m1", in_flight=2, queue_depth=1, memory_bytes=3 * 2**30, phase="decode")
    up.add_model("m2", state="loading", staging=_job(model_id="m2"))
    up.add_model(HOSTILE_MODEL, state="failed", error=HOSTILE_ERROR)
    await down.stop()  # connections refused from the first poll on
    yield nodes
    await stop_all(nodes)


CAT = catalogue(
    ModelSpec(id="m1", source="org/m1", aliases=("one",), memory_gb=1.0, kv_gb=0.1),
    ModelSpec(id="m2", source="org/m2", memory_gb=1.0, kv_gb=0.1, keep_loaded=True),
)


async def test_the_page_is_open_and_carries_no_data(up_and_down: list[FakeNeuron]) -> None:
    """No token needed for the shell (it asks for one); none of the fleet's facts in it;
    /admin/* still refuses a caller without the token, and nothing prompts for Basic."""
    async with gateway(up_and_down, CAT, admin_token="admin-secret") as client:
        resp = await client.get("/dashboard")
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "WWW-Authenticate" not in resp.headers
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "connect-src 'self'" in csp and "unsafe-inline" not in csp
        page = await resp.text()
        for fact in ("n-up", "m1", "Apple M2 Ultra", "admin-secret"):
            assert fact not in page
        assert re.search(r'<body [^>]*data-auth="token"', page)
        assert "http-equiv" not in page  # no meta refresh: it updates in place

        state = await client.get("/admin/state")
        assert state.status == 401 and "WWW-Authenticate" not in state.headers
        bearer = await client.get("/admin/state", headers={"Authorization": "Bearer admin-secret"})
        assert bearer.status == 200
        unload = await client.post("/admin/models/m1/unload")
        assert unload.status == 401


async def test_the_csp_admits_exactly_the_page_s_own_script_and_style() -> None:
    async with gateway([], catalogue()) as client:
        resp = await client.get("/dashboard")
        page, csp = await resp.text(), resp.headers["Content-Security-Policy"]
    assert re.search(r'<body [^>]*data-auth="open"', page)
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    assert "<script src" not in page and '<link rel="stylesheet"' not in page


async def test_a_closed_admin_says_so_instead_of_asking() -> None:
    """API keys on and no admin token: /admin/* refuses everyone, and the page knows."""
    from cortex.config import ApiKey

    async with gateway([], catalogue(), api_keys=(ApiKey(key="k" * 16, models=("*",)),)) as c:
        page = await (await c.get("/dashboard")).text()
    assert re.search(r'<body [^>]*data-auth="closed"', page)


async def test_admin_state_carries_phase_and_the_token_counter() -> None:
    """What the page's phase badge and tok/s sparkline read, fresh at every poll."""
    (node,) = await fleet("n1")
    try:
        m = node.add_model("m1", phase="decode", completion_tokens=42)
        async with gateway([node]) as client:
            state = await (await client.get("/admin/state")).json()
            (entry,) = state["nodes"][0]["models"]
            assert (entry["phase"], entry["completion_tokens"]) == ("decode", 42)
            (place,) = next(mm for mm in state["models"] if mm["id"] == "m1")["placements"]
            assert (place["phase"], place["completion_tokens"]) == ("decode", 42)
            m.phase, m.completion_tokens = "idle", 99
            await client.app[POLLER].poll_once()
            state = await (await client.get("/admin/state")).json()
            (entry,) = state["nodes"][0]["models"]
            assert (entry["phase"], entry["completion_tokens"]) == ("idle", 99)
    finally:
        await stop_all([node])


@pytest.mark.skipif(chromium.missing() is not None, reason=str(chromium.missing()))
async def test_the_page_in_chromium_escapes_and_shows_every_figure(
    up_and_down: list[FakeNeuron],
) -> None:
    """Hostile node, model and error text arrive as text, never as markup (and, as the CSP
    would log a blocked inline handler, no console error either); the down node, the
    busy node's phase and load, the stage's bar and the failed model's error all show."""
    async with gateway(up_and_down, CAT) as client, Browser.open() as b:
        await b.goto(str(client.make_url("/dashboard")))
        await b.wait_js("document.body.dataset.live === 'yes'", what="the first update")
        await b.wait_js("document.querySelectorAll('.card[data-node]').length === 2")
        names = await b.js(
            "[...document.querySelectorAll('.card .name')].map((e) => e.textContent)"
        )
        assert sorted(names) == sorted(["n-up", HOSTILE_NODE])
        assert await b.js("document.querySelectorAll('img').length") == 0
        assert await b.js("document.querySelectorAll('script').length") == 1
        assert await b.js("window.__pwned === undefined")

        down = await b.js(
            "(() => { const c = [...document.querySelectorAll('.card')]"
            ".find((c) => c.dataset.healthy === 'no'); return c && c.textContent; })()"
        )
        assert down is not None and "never seen" in down and "/status" in down
        up = ".card[data-node='n-up']"
        assert await b.js(f'document.querySelector("{up} [data-phase]").dataset.phase') == (
            "decode"
        )
        assert "2 / 1" in await b.js(f'document.querySelector("{up}").textContent')
        # 48 GiB available less m1's 3 GiB of 64 GiB: 19 GiB used, 30 %.
        assert await b.js(f'document.querySelector("{up} .bar.mem > div").style.width') == "30%"

        # m2's stage: one bar in its placements (and one on the node card), 38 %.
        bar = "tr[data-model='m2'] progress"
        assert await b.js(f'document.querySelector("{bar}").value') == 38
        assert await b.js("document.querySelectorAll('progress').length") == 2
        why = await b.js("document.querySelector(\"tr[data-model='m2'] .why\").textContent")
        assert "1 wanted" in why
        errors = await b.js("document.querySelector('#errors').textContent")
        assert HOSTILE_ERROR in errors and HOSTILE_MODEL in errors
        problems = list(b.problems)
    assert problems == [], problems


@pytest.mark.skipif(chromium.missing() is not None, reason=str(chromium.missing()))
async def test_a_kept_model_unloads_from_the_page_only_by_force_and_is_held() -> None:
    """Unload of a keep_loaded model: refused (409, said on the page); with "force" it
    goes and the row shows the operator's hold; load from the page releases it."""
    (node,) = await fleet("n1")
    node.add_model("m2")
    try:
        async with (
            gateway([node], CAT, admin_token="admin-secret") as client,
            Browser.open() as b,
        ):
            await b.goto(str(client.make_url("/dashboard")))
            await b.type_into("#token", "admin-secret")
            await b.click("#token-save")
            row = "tr[data-model='m2']"
            places = f'document.querySelector("{row} td:nth-child(3)")?.dataset.state'
            await b.wait_js(f"{places} === 'ready'", what="m2 ready on the page")

            await b.click(f"{row} button[data-action='unload']")
            await b.wait_js("document.querySelector('#result').dataset.outcome === 'failed'")
            assert "keep_loaded" in await b.js("document.querySelector('#result').textContent")
            assert await b.js(places) == "ready"

            await b.click("#force")
            await b.click(f"{row} button[data-action='unload']")
            await b.wait_js(f"{places} === 'nowhere'", what="m2 unloaded on the page")
            await b.wait_js(f"document.querySelector(\"{row} [data-hold='yes']\") !== null")
            assert "forced unload" in await b.js(f'document.querySelector("{row}").textContent')
            state = await (
                await client.get("/admin/state", headers={"Authorization": "Bearer admin-secret"})
            ).json()
            (m2,) = [m for m in state["models"] if m["id"] == "m2"]
            assert m2["life"]["hold"]["reason"] == "forced unload" and m2["placements"] == []

            await b.click("#force")  # a plain load releases the hold
            await b.click(f"{row} button[data-action='load']")
            await b.wait_js(f"{places} === 'ready'", what="m2 loaded again")
            await b.wait_js(f"document.querySelector(\"{row} [data-hold='yes']\") === null")
            problems = list(b.problems)
    finally:
        await stop_all([node])
    # The one refusal is the browser's own log line for a 409 answer, nothing else.
    assert len(problems) == 1 and "409" in problems[0] and "log (network)" in problems[0], problems
