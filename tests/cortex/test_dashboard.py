"""GET /dashboard: the fleet page, rendered against fake neurons."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import AsyncIterator

import pytest

from shared.catalogue import ModelSpec
from tests.cortex.fakes import FakeNeuron, catalogue, fleet, gateway, stop_all

HOSTILE_NODE = "<script>alert('node')</script>"
HOSTILE_MODEL = 'm"><img src=x onerror=alert(1)>'


@pytest.fixture
async def up_and_down() -> AsyncIterator[list[FakeNeuron]]:
    """Two nodes: "n-up" serves m1 (and one oddly named model); the other is down."""
    nodes = await fleet("n-up", HOSTILE_NODE)
    up, down = nodes
    up.add_model("m1", in_flight=2, queue_depth=1, memory_bytes=3 * 2**30)
    up.add_model(HOSTILE_MODEL, state="loading")
    await down.stop()  # connections refused from the first poll on
    yield nodes
    await stop_all(nodes)


def _rows(page: str, attr: str) -> dict[str, str]:
    """The <tr data-{attr}="..."> rows of the page, by that (still escaped) attribute."""
    return {
        m.group(1): m.group(0)
        for m in re.finditer(rf'<tr [^>]*data-{attr}="([^"]*)".*?</tr>', page)
    }


async def test_dashboard_shows_nodes_models_and_catalogue(up_and_down: list[FakeNeuron]) -> None:
    cat = catalogue(
        ModelSpec(id="m1", source="org/m1", aliases=("one",), memory_gb=1.0, kv_gb=0.1),
        ModelSpec(id="m2", source="org/m2", memory_gb=1.0, kv_gb=0.1, keep_loaded=True),
    )
    async with gateway(up_and_down, cat) as client:
        resp = await client.get("/dashboard")
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()

    assert '<meta http-equiv="refresh" content="2">' in page
    assert "cortex up" in page
    assert "<script" not in page.lower() and "<img" not in page.lower()

    nodes = _rows(page, "node")
    escaped_node = "&lt;script&gt;alert(&#x27;node&#x27;)&lt;/script&gt;"
    assert set(nodes) == {"n-up", escaped_node}
    assert 'data-healthy="yes"' in nodes["n-up"] and ">healthy<" in nodes["n-up"]
    assert 'data-healthy="no"' in nodes[escaped_node] and ">unhealthy<" in nodes[escaped_node]
    assert "Apple M2 Ultra" in nodes["n-up"] and "metal" in nodes["n-up"]
    # 48 GiB available less the 3 GiB m1 holds, of 64 GiB.
    assert "45.0 GiB" in nodes["n-up"] and "64.0 GiB" in nodes["n-up"]
    assert "/status: " in nodes[escaped_node]  # the last poll error is shown
    assert page.count(">healthy<") == 1 and page.count(">unhealthy<") == 1

    # The model on the healthy node, with its state and load.
    assert re.search(r"<b>m1</b></td><td><span [^>]*data-state=\"ready\"", page)
    assert 'data-state="loading"' in page
    assert html.escape(HOSTILE_MODEL) in page

    models = _rows(page, "model")
    assert set(models) == {"m1", "m2"}
    assert "n-up" in models["m1"] and "one" in models["m1"]
    assert "nowhere" in models["m2"]
    assert "1 / 0" in models["m2"]  # keep_loaded wants one replica, none present


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def test_dashboard_needs_the_admin_token(up_and_down: list[FakeNeuron]) -> None:
    """The page is admin data: token as bearer, or as a browser's Basic password."""
    async with gateway(up_and_down, admin_token="admin-secret") as client:
        resp = await client.get("/dashboard")
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
        basic = await client.get("/dashboard", headers=_basic("ops", "admin-secret"))
        assert basic.status == 200
        bad = await client.get("/dashboard", headers=_basic("ops", "nope-nope"))
        assert bad.status == 401
        admin = await client.get("/admin/state")
        assert "WWW-Authenticate" not in admin.headers
        wrong = await client.get("/dashboard", headers={"Authorization": "Bearer nope-nope"})
        assert wrong.status == 401
        ok = await client.get("/dashboard", headers={"Authorization": "Bearer admin-secret"})
        assert ok.status == 200
        assert ok.content_type == "text/html"
