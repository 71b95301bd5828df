"""End to end with a fleet token: cortex drives a real neuron that nobody else can."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import http_json, wait_until

TOKEN = "e2e-fleet-token-0123456789abcdef"


def test_cortex_with_token_drives_a_real_neuron_with_token(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str, tmp_path: Path
) -> None:
    """Poll, cold load and chat all work through cortex; the neuron refuses a caller without
    the token (a load of /etc included), and its probes stay open."""
    token_file = tmp_path / "fleet-token"
    token_file.write_text(TOKEN + "\n")
    n = neuron_factory({"fleet_token_file": str(token_file)}, name="a")
    c = cortex_factory(
        [("a", n)],
        [{"id": model_id, "source": str(demo_model), "keep_loaded": True}],
        fleet_token_file=str(token_file),
    )
    wait_until(
        lambda: any(
            loc["state"] == "ready" and loc["healthy"] for loc in c.model(model_id)["locations"]
        ),
        120,
        f"{model_id} ready through cortex",
    )
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer = c.post("/v1/chat/completions", body)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] is not None

    # Anyone else: 401 on the API, the probes open.
    for path, req in (
        ("/models", None),
        ("/models/load", {"model_id": "evil", "source": "/etc"}),
        ("/models/unload", {"model_id": model_id}),
        ("/store/purge-staging", {}),
        ("/v1/chat/completions", body),
    ):
        status, answer = http_json(n.url + path, req)
        assert status == 401, (path, answer)
        assert answer["error"]["code"] == "invalid_api_key"
    assert http_json(n.url + "/health")[0] == 200
    assert n.model(model_id)["state"] == "ready"  # n.model sends the token

    # Even with the token, a load from outside the store and the model roots is refused.
    status, answer = n.post("/models/load", {"model_id": "evil", "source": "/etc"})
    assert (status, answer["error"]["code"]) == (400, "invalid_model_path")
    assert TOKEN not in n.log() and TOKEN not in c.log()
