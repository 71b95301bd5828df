"""`cortex trace`: every number says whose count or whose clock it is."""

from __future__ import annotations

from typing import Any

from cortex.cli.trace import cortex_tokens, neuron_prompt, timeline


def _joined(cortex: dict[str, Any], neuron: dict[str, Any]) -> dict[str, Any]:
    return {"id": "r1", "cortex": {"id": "r1", **cortex}, "neuron": neuron, "nodes": {"a": neuron}}


def test_the_runners_prompt_count_is_the_count_and_the_neurons_is_an_estimate() -> None:
    neuron = {
        "id": "r1",
        "status": "200",
        "prompt_tokens": 14,  # the neuron's estimate, before the chat template
        "runner_prompt_tokens": 6,  # the runner's usage
        "completion_tokens": 8,
        "tok_s": 40.5,
    }
    cortex = {
        "stream": True,
        "node": "a",
        "nodes": ["a"],
        "status": "200",
        "prompt_tokens": 6,
        "completion_tokens": 8,
        "tokens_from": "usage",
        "tok_s": 39.0,
    }
    text = timeline(_joined(cortex, neuron))
    assert "prompt 6 tokens (runner's count; the neuron estimated 14)" in text
    assert "(tokenizer)" not in text
    assert (
        "prompt 6 tokens, completion 8 tokens (the runner's usage, relayed by the neuron)" in text
    )
    assert "decode 40.5 tok/s after the first token (the neuron's clock)" in text
    assert "relay 39.0 tok/s after the first token (cortex's clock)" in text
    assert "first token at cortex" in text


def test_counts_without_usage_say_so() -> None:
    assert neuron_prompt({"prompt_tokens": 14}) == (
        "prompt about 14 tokens (the neuron's estimate; the runner gave no count)"
    )
    assert neuron_prompt({"runner_prompt_tokens": 6}) == "prompt 6 tokens (runner's count)"
    assert neuron_prompt({}) == "prompt not counted"
    framed = cortex_tokens({"tokens_from": "frames", "completion_tokens": 5})
    assert framed.startswith("completion 5 tokens (cortex counted content frames")
    assert "prompt not counted" in framed
    assert cortex_tokens({}).startswith("no tokens counted")


def test_a_unary_answer_is_not_called_a_first_token() -> None:
    text = timeline(_joined({"stream": False, "ttft_s": 2.3}, {"error": "HTTP 404"}))
    assert "+2300.0 ms  answer at cortex (unary: one piece)" in text
    assert "first token" not in text
    assert "neuron a:\n  (no trace: HTTP 404)" in text
