"""End to end: an operator's hold (a forced unload) survives a cortex restart."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import wait_until
from tests.e2e.conftest import CortexProcess


def _ready_on(c: CortexProcess, model_id: str) -> list[str]:
    return sorted(
        loc["node"]
        for loc in c.model(model_id)["locations"]
        if loc["state"] == "ready" and loc["healthy"]
    )


def _life(c: CortexProcess, model_id: str) -> dict[str, Any]:
    _, state = c.get("/admin/state")
    return dict(next(m for m in state["models"] if m["id"] == model_id)["life"])


async def test_forced_unload_hold_survives_a_cortex_restart(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str
) -> None:
    """A keep_loaded model unloaded with force stays unloaded, its hold shown, after
    cortex restarts with the same config; the next admin load releases it."""
    a = neuron_factory(name="a")
    held = {"id": model_id, "source": str(demo_model), "keep_loaded": True}
    # A witness: the restarted reconciler loads it, so it has surely passed the held one.
    other = f"{model_id}-w"
    witness = {"id": other, "source": str(demo_model), "keep_loaded": True}
    c = cortex_factory([("a", a)], [held, witness])
    for mid in (model_id, other):
        wait_until(lambda mid=mid: _ready_on(c, mid) == ["a"], 120, f"{mid} loaded by wish")

    status, body = c.post(f"/admin/models/{model_id}/unload", {"force": True})
    assert status == 200 and body["unloaded"] == ["a"], body
    assert _life(c, model_id)["hold"]["reason"] == "forced unload"
    saved = json.loads((c.dir / "cortex-state.json").read_text())
    assert saved["holds"][model_id]["reason"] == "forced unload"

    c.stop()
    # Behind cortex's back, so that only the restarted reconciler can bring it back.
    status, _ = a.post("/models/unload", {"model_id": other})
    assert status == 200
    wait_until(lambda: a.model(other) is None, 60, "the witness gone from the neuron")
    assert a.model(model_id) is None

    c.start()
    wait_until(lambda: _ready_on(c, other) == ["a"], 120, "the witness reloaded by wish")
    life = _life(c, model_id)
    assert life["hold"]["reason"] == "forced unload", life
    assert _ready_on(c, model_id) == [] and a.model(model_id) is None

    status, body = c.post(f"/admin/models/{model_id}/load", {})
    assert status == 202 and "released the hold (forced unload)" in body["did"], body
    wait_until(lambda: _ready_on(c, model_id) == ["a"], 120, "loaded after the admin load")
    assert _life(c, model_id)["hold"] is None
    assert json.loads((c.dir / "cortex-state.json").read_text())["holds"] == {}
