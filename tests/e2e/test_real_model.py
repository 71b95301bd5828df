"""The real model through the real fleet: answers that mean something, bytes unchanged.

SmolLM2-135M-Instruct (converted by `neuron real-model`) behind one neuron and
one cortex. Greedy decoding is deterministic, so the same prompt must give the
same tokens through cortex, straight from the neuron, and from `mlx_lm.generate`
in this process: any byte a hop adds, drops or re-encodes shows up here, and so
does a chat template that is not applied. Kept few: this CPU decodes ~8 tok/s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import openai
import pytest

from tests.conftest import TEST_ROOT, NeuronProcess, stop_quietly
from tests.e2e.conftest import CortexProcess

MODEL = "smollm2-135m"
CAPITAL: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
# A handful of prompts: a fact, digits, a list, and one whose greedy answer runs
# into the token limit (so `length` and `stop` both show up across the table).
GREEDY_PROMPTS = [
    "What is the capital of France?",
    "What is 12 plus 30? Answer with the number.",
    "Name three colours.",
    "Write one sentence about the sea.",
]
GREEDY_TOKENS = 8


@attrs.frozen
class Fleet:
    neuron: NeuronProcess
    cortex: CortexProcess

    def client(self, url: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, real_model: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("real-model-fleet")
    neuron = NeuronProcess.start(
        root / "neuron", {"model_roots": [*map(str, TEST_ROOT), str(real_model.parent)]}
    )
    cortex = CortexProcess.write(
        root / "cortex",
        [("a", neuron)],
        [{"id": MODEL, "source": str(real_model), "keep_loaded": True}],
    )
    try:
        cortex.start()
        neuron.wait_state(MODEL, "ready")
        yield Fleet(neuron=neuron, cortex=cortex)
    finally:
        cortex.stop()
        stop_quietly(neuron)


def _greedy(client: openai.OpenAI, prompt: str) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of one greedy chat."""
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=GREEDY_TOKENS,
        temperature=0,
    )
    assert resp.usage is not None
    choice = resp.choices[0]
    return choice.message.content or "", resp.usage.completion_tokens, str(choice.finish_reason)


def _in_process(model_dir: Path, prompts: list[str]) -> list[tuple[str, int]]:
    """mlx_lm.generate in this process, greedy, with the model's chat template."""
    from mlx_lm import load, stream_generate

    loaded = load(str(model_dir))
    model, tokenizer = loaded[0], cast(Any, loaded[1])
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
        pieces = list(stream_generate(model, tokenizer, ids, max_tokens=GREEDY_TOKENS))
        # Counted as mlx_lm.server counts them: an end-of-turn token that ends the
        # answer is one of its tokens, though not part of its text.
        out.append(("".join(p.text for p in pieces), pieces[-1].generation_tokens))
    return out


def test_a_factual_question_is_answered_through_cortex(fleet: Fleet) -> None:
    """'What is the capital of France?' through cortex says Paris, in one piece."""
    with fleet.client(fleet.cortex.url) as client:
        resp = client.chat.completions.create(
            model=MODEL, messages=CAPITAL, max_tokens=24, temperature=0
        )
    text = resp.choices[0].message.content or ""
    assert "Paris" in text, text
    assert resp.model == MODEL


def test_a_factual_question_is_answered_through_cortex_streamed(fleet: Fleet) -> None:
    """The same question streamed: the pieces join into an answer that says Paris."""
    with fleet.client(fleet.cortex.url) as client:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=CAPITAL,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks: list[Any] = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer arrives token by token"
    assert "Paris" in "".join(pieces), pieces
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_greedy_answers_are_the_same_through_every_hop(fleet: Fleet, real_model: Path) -> None:
    """Temperature 0: cortex == the neuron == mlx_lm in process, text and token count."""
    with (
        fleet.client(fleet.cortex.url) as via_cortex,
        fleet.client(fleet.neuron.url) as via_neuron,
    ):
        cortex = [_greedy(via_cortex, p) for p in GREEDY_PROMPTS]
        neuron = [_greedy(via_neuron, p) for p in GREEDY_PROMPTS]
    local = _in_process(real_model, GREEDY_PROMPTS)
    rows = zip(GREEDY_PROMPTS, cortex, neuron, local, strict=True)
    table = "\n".join(
        f"{p!r}\n  cortex {c!r}\n  neuron {n!r}\n  local  {x!r}" for p, c, n, x in rows
    )
    print(f"\ngreedy, {GREEDY_TOKENS} tokens at most:\n{table}")
    assert [c[:2] for c in cortex] == local, table
    assert neuron == cortex, table
    assert any("Paris" in text for text, _, _ in cortex), table
