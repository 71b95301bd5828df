"""Benches stay out of `make test`: only that they import, parse options, and write
their BENCHMARKS.md section in place."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import benchmarks_md
from neuron.store.demo_model import Shape, build_demo_model


@pytest.mark.parametrize(
    "module",
    [
        "bench.gateway",
        "bench.bare_proxy",
        "bench.neuron",
        "bench.token_server",
        "bench.grammar",
        "bench.structured",
        "bench.embeddings",
        "bench.hostile",
        "bench.heartbeat",
        "bench.speculative",
    ],
)
def test_bench_help(module: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_benchmarks_md_sections_are_replaced_in_place(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    benchmarks_md.update("bench-a", "make bench-a", "| a | 1 |", path)
    benchmarks_md.update("bench-b", "make bench-b", "| b | 2 |", path)
    benchmarks_md.update("bench-a", "make bench-a", "| a | 3 |", path)
    text = path.read_text()
    assert text.count("## bench-a") == 1 and text.count("## bench-b") == 1
    assert "| a | 3 |" in text and "| a | 1 |" not in text and "| b | 2 |" in text
    assert text.index("## bench-a") < text.index("## bench-b")
    assert "`make bench-a`" in text and "CPUs" in text


def test_demo_model_shape_options(tmp_path: Path) -> None:
    """A bigger random model from the same builder; the default shape is the demo's."""
    assert Shape() == Shape(64, 128, 2)
    path = build_demo_model(tmp_path / "m", shape=Shape(96, 160, 3))
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (96, 160)
    assert (config["num_hidden_layers"], config["head_dim"]) == (3, 24)
    with pytest.raises(ValueError, match="multiple of 4"):
        Shape(hidden_size=66)
