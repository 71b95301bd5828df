"""Which stop sequence ended an answer (neuron.runner.stops), and the unstreamed
answer assembled from a stream that names it. Pure: no runner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from neuron.runner.stops import matched_stop
from shared.assemble import assemble

EOS = {2}
STOPS: list[tuple[str, Sequence[int]]] = [(" Paris", [7042]), ("\n\n", [1116]), ("END.", [9, 30])]

CASES: list[tuple[str, list[int], str | None]] = [
    ("the turn's end token", [504, 3575, 2], None),
    ("a one-token sequence", [504, 3575, 7042], " Paris"),
    ("a two-token sequence", [504, 9, 30], "END."),
    ("the second token of a sequence alone is not it", [504, 30], None),
    ("max_tokens or an unknown token: none", [504, 3575], None),
    ("nothing generated", [], None),
]


@pytest.mark.parametrize(("tokens", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matched_stop(tokens: list[int], want: str | None) -> None:
    assert matched_stop(tokens, EOS, STOPS) == want


def test_the_longest_sequence_ending_there_wins() -> None:
    stops: list[tuple[str, Sequence[int]]] = [(".", [30]), ("END.", [9, 30])]
    assert matched_stop([1, 9, 30], EOS, stops) == "END."
    assert matched_stop([1, 8, 30], EOS, stops) == "."


def test_the_assembled_answer_keeps_the_matched_sequence() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    chunks: list[dict[str, Any]] = [
        {**head, "choices": [{"index": 0, "delta": {"content": "It is"}, "finish_reason": None}]},
        {
            **head,
            "choices": [
                {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": " Paris"}
            ],
        },
    ]
    (choice,) = assemble(chunks)["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == " Paris"
    # A turn's end names none: the field is absent, as mlx_lm would send it.
    chunks[1]["choices"][0].pop("stop_reason")
    assert "stop_reason" not in assemble(chunks)["choices"][0]
