"""`cortex bench` and X-Cortex-Node over a real fleet: two neurons with the demo model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import NeuronProcess, http_json, wait_until
from tests.e2e.conftest import CortexProcess

TOKEN = "bench-admin-token"
KEY = "sk-bench-client"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CORTEX_ADMIN_TOKEN": TOKEN},
    )


def _served(n: NeuronProcess, model_id: str) -> float:
    """Requests the neuron proxied for the model (its own counter), any outcome."""
    with urllib.request.urlopen(n.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = rf'^neuron_requests_total{{model="{re.escape(model_id)}",[^}}]*}} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


def _fleet(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> tuple[NeuronProcess, NeuronProcess, CortexProcess]:
    a: NeuronProcess = neuron_factory(name="a")
    b: NeuronProcess = neuron_factory(name="b")
    c: CortexProcess = cortex_factory(
        [("a", a), ("b", b)],
        [{"id": model_id, "source": str(demo_model), "keep_loaded": True, "replicas": 2}],
        admin_token=TOKEN,
        api_keys=[{"key": KEY, "models": ["*"]}],
    )
    a.wait_state(model_id, "ready")
    b.wait_state(model_id, "ready")

    def two() -> bool:
        _, state = http_json(c.url + "/admin/state", token=TOKEN)
        m = next(x for x in state["models"] if x["id"] == model_id)
        ready = [p for p in m["placements"] if p["state"] == "ready" and p["healthy"]]
        return len(ready) == 2

    wait_until(two, 60, "two ready replicas in cortex")
    return a, b, c


def test_bench_prints_tok_s_and_ttft_per_replica(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> None:
    """Each replica is measured on its own: every stream ok, tokens counted, a rate and
    a time to first token; the JSON says the same."""
    _, _, c = _fleet(neuron_factory, cortex_factory, demo_model, model_id)
    # Streams long enough to time (shared.rates: a rate needs >= 0.1 s of decoding).
    done = _bench(model_id, "--url", c.url, "--streams", "2", "--tokens", "256")
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    head = f"bench {model_id}: 2 replica(s), 2 stream(s) each, up to 256 tokens per stream"
    assert lines[0] == head
    assert lines[1].split() == [
        "node", "ok", "tokens", "tok/s", "tok/s/stream", "TTFT", "p50", "TTFT", "max", "wall"
    ]  # fmt: skip
    rows = {ln.split()[0]: ln.split() for ln in lines[2:4]}
    assert set(rows) == {"a", "b"}
    for row in rows.values():
        # A rate only over a real interval (shared.rates): a dash for a stream too quick
        # to time.
        assert row[1] == "2/2" and int(row[2]) > 0 and row[6] == "ms"
        assert row[3] == "\N{EN DASH}" or float(row[3]) > 0

    js = _bench(model_id, "--url", c.url, "--streams", "1", "--tokens", "256", "--json")
    assert js.returncode == 0, js.stderr
    report = json.loads(js.stdout)
    assert [r["node"] for r in report["replicas"]] == ["a", "b"]
    for r in report["replicas"]:
        assert r["ok"] == 1 and r["errors"] == [] and 0 < r["tokens"] <= 256
        assert r["tok_s"] is None or r["tok_s"] > 0
        assert r["ttft_s_p50"] > 0 and r["ttft_s_max"] >= r["ttft_s_p50"]

    only = _bench(model_id, "--url", c.url, "--nodes", "nosuch")
    assert only.returncode == 1 and "not ready on nosuch" in only.stderr


def test_x_cortex_node_pins_a_request_and_needs_the_admin_token(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> None:
    """Pinned to b, every request lands on b (its counter moves, a's does not); an API
    key with the header is refused 401; a node without the model is a 503 naming it."""
    a, b, c = _fleet(neuron_factory, cortex_factory, demo_model, model_id)
    ask = {"model": model_id, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    before_a, before_b = _served(a, model_id), _served(b, model_id)

    def post(token: str, node: str) -> tuple[int, Any]:
        data = json.dumps(ask).encode()
        req = urllib.request.Request(
            c.url + "/v1/chat/completions",
            data,
            {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {token}",
                "X-Cortex-Node": node,
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    for _ in range(4):
        status, body = post(TOKEN, "b")
        assert status == 200, body
    assert _served(b, model_id) == before_b + 4
    assert _served(a, model_id) == before_a
    status, body = post(KEY, "b")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = post(TOKEN, "nosuch")
    assert status == 400 and body["error"]["param"] == "X-Cortex-Node"
