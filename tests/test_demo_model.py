"""The demo model: deterministic, loadable by mlx_lm, shaped for 2-way tensor sharding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from neuron.demo_model import build_demo_model


def test_demo_model_is_deterministic(tmp_path: Path) -> None:
    """The same seed gives identical files; another seed other weights."""
    a = build_demo_model(tmp_path / "a", seed=7)
    b = build_demo_model(tmp_path / "b", seed=7)
    c = build_demo_model(tmp_path / "c", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    config = json.loads((a / "config.json").read_text())
    assert config["num_attention_heads"] == 4
    assert config["num_key_value_heads"] == 2


def test_demo_model_generates(demo_model: Path) -> None:
    """mlx_lm loads it and greedy generation through its chat template yields tokens."""
    from mlx_lm import generate, load

    model, tok = load(str(demo_model))[:2]
    prompt = tok.apply_chat_template(  # type: ignore[no-untyped-call]
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    out = generate(model, tok, prompt=prompt, max_tokens=8)
    assert isinstance(out, str) and out


def test_demo_model_cli_help_says_noise() -> None:
    """`neuron demo-model --help` warns that the model produces noise."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "neuron"), "demo-model", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "noise" in out
