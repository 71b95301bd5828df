"""The runner shim makes mlx_lm's pipeline follow cortex's proportional layer split."""

from __future__ import annotations

from typing import Any

import pytest

from neuron.runner.main import apply_pipeline_split


class _Group:
    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.fixture
def restore_pipeline() -> Any:
    from mlx_lm.models.pipeline import PipelineMixin

    original = PipelineMixin.pipeline
    yield PipelineMixin
    PipelineMixin.pipeline = original  # type: ignore[method-assign]


def _stack(mixin: Any, rank: int, size: int) -> Any:
    class Stack(mixin):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layers = list(range(8))

    s = Stack()
    s.pipeline(_Group(rank, size))
    return s


def test_even_split_without_the_env(restore_pipeline: Any) -> None:
    """No split given: mlx_lm's even split (4 + 4 of 8 layers)."""
    apply_pipeline_split(None)
    s = _stack(restore_pipeline, 0, 2)
    assert (s.start_idx, s.end_idx) == (4, 8)


def test_split_from_cortex_is_honoured(restore_pipeline: Any) -> None:
    """ "6,2": rank 0 (the last layers) runs 6, rank 1 (the first) runs 2."""
    apply_pipeline_split("6,2")
    rank0, rank1 = _stack(restore_pipeline, 0, 2), _stack(restore_pipeline, 1, 2)
    assert (rank0.start_idx, rank0.end_idx) == (2, 8)
    assert (rank1.start_idx, rank1.end_idx) == (0, 2)
