"""The demo model: deterministic, loadable by mlx_lm, shaped for 2-way tensor sharding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from neuron.store.demo_model import build_demo_model


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


def test_demo_model_never_deletes_other_files(tmp_path: Path) -> None:
    """A non-empty directory that is not a demo model is refused, its files kept."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    r = subprocess.run(
        [str(Path(sys.executable).parent / "neuron"), "demo-model", str(precious)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "not a demo model" in r.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    # An earlier demo model is replaced in place.
    again = build_demo_model(build_demo_model(tmp_path / "demo", seed=1), seed=2)
    assert "seed 2" in (again / "README.md").read_text()


def test_cli_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    """A bad port or an unreadable config is exit 2 with a message naming it."""
    neuron = str(Path(sys.executable).parent / "neuron")
    bad_port = subprocess.run(
        [neuron, "serve", "--port", "70000"], capture_output=True, text=True, timeout=60
    )
    assert bad_port.returncode == 2 and "70000" in bad_port.stderr
    assert "Traceback" not in bad_port.stderr
    a_dir = subprocess.run(
        [neuron, "serve", "-c", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert a_dir.returncode == 2 and str(tmp_path) in a_dir.stderr
    assert "Traceback" not in a_dir.stderr
