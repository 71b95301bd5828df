"""The runner's model name replaced in its bytes, never inside a string's content."""

from __future__ import annotations

import json
from typing import Any

from neuron.http.proxy import model_field, renamed
from neuron.runner.request_check import RUNNER_MODEL_NAME


def _frame(obj: Any) -> bytes:
    # mlx_lm.server's own encoding: json.dumps with its default separators.
    return f"data: {json.dumps(obj)}\n\n".encode()


def test_the_model_value_is_replaced_and_nothing_else() -> None:
    """Only the `model` key's value changes; content quoting the same text stays."""
    trick = f'"model": "{RUNNER_MODEL_NAME}"'
    chunk = {
        "id": "c1",
        "model": RUNNER_MODEL_NAME,
        "choices": [{"index": 0, "delta": {"content": trick}}],
    }
    out = renamed(_frame(chunk) * 2, model_field('my "odd" model/ü'))
    frames = [json.loads(f[6:]) for f in out.split(b"\n\n") if f]
    assert [f["model"] for f in frames] == ['my "odd" model/ü'] * 2
    assert [f["choices"][0]["delta"]["content"] for f in frames] == [trick] * 2


def test_bytes_without_the_name_are_unchanged() -> None:
    """Keepalives and error frames pass as they are."""
    raw = b': keepalive\n\ndata: {"error": {"message": "x"}}\n\n'
    assert renamed(raw, model_field("m")) == raw
