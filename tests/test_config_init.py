"""`cortex init` / `neuron init` starter files, and the README's configuration reference.

A starter must load unchanged with `check` and with `serve` (started for real
here, then stopped); the reference must name every key the config classes
accept, nested tables included.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cortex.cli import main as cortex_cli
from cortex.config import CortexConfig
from neuron.cli import main as neuron_cli
from neuron.config import NeuronConfig
from shared.starter import config_keys, render
from tests.conftest import http_json, wait_until

README = Path(__file__).parents[1] / "README.md"


def _section(text: str, title: str) -> str:
    """The body of the `### title` subsection of the README's configuration reference."""
    ref = text.split("## Configuration reference", 1)
    assert len(ref) == 2, "README has no '## Configuration reference' section"
    body = ref[1].split("\n## ", 1)[0]
    parts = body.split(f"### {title}\n", 1)
    assert len(parts) == 2, f"README's configuration reference has no '### {title}'"
    return parts[1].split("\n### ", 1)[0]


def undocumented(cls: type, section: str) -> list[str]:
    """Keys of `cls` (dotted for nested tables) the section does not name in backticks."""
    return [
        k.name
        for k in config_keys(cls)
        if not (k.table or k.array) and f"`{k.name}`" not in section
    ]


def test_readme_documents_every_config_key() -> None:
    """Every CortexConfig and NeuronConfig key, nested ones too, is in the reference."""
    text = README.read_text()
    missing = {
        file: undocumented(cls, _section(text, file))
        for file, cls in (("cortex.toml", CortexConfig), ("neuron.toml", NeuronConfig))
    }
    missing = {f: keys for f, keys in missing.items() if keys}
    assert not missing, "README configuration reference lacks: " + "; ".join(
        f"{f}: {', '.join(keys)}" for f, keys in missing.items()
    )


def test_the_check_finds_a_missing_key() -> None:
    """The check names an undocumented key, nested ones by their dotted name."""
    section = _section(README.read_text(), "neuron.toml")
    assert undocumented(NeuronConfig, section) == []
    cut = section.replace("`runner.max_tokens`", "").replace("`drain_s`", "")
    assert undocumented(NeuronConfig, cut) == ["drain_s", "runner.max_tokens"]


def test_cortex_init_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The starter (and its empty catalogue) pass `cortex check` unchanged."""
    out = tmp_path / "etc" / "cortex.toml"
    assert cortex_cli.main(["init", "-o", str(out), "--neuron", "a=http://10.0.0.1:9410"]) == 0
    text = out.read_text()
    assert text.startswith("# cortex.toml: written by `cortex init`")
    data = tomllib.loads(text)
    assert data["neurons"] == [{"name": "a", "url": "http://10.0.0.1:9410"}]
    assert data["catalogue"] == "models.toml" and (out.parent / "models.toml").is_file()
    # Every key is in the file, set or commented out at its default.
    for k in config_keys(CortexConfig):
        leaf = k.name.rpartition(".")[2]
        assert re.search(rf"^(# )?(\[\[)?{re.escape(leaf)}\b", text, re.M), k.name
    assert cortex_cli.main(["check", "-c", str(out)]) == 0
    assert "neuron     a http://10.0.0.1:9410" in capsys.readouterr().out
    config = CortexConfig.from_file(out)
    assert config.api_keys == () and config.load_wait_s == CortexConfig().load_wait_s


def test_neuron_init_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The neuron starter passes `neuron check`; machine values set, the rest at defaults."""
    out = tmp_path / "neuron.toml"
    store = tmp_path / "store"
    assert neuron_cli.main(["init", "-o", str(out), "--store-dir", str(store)]) == 0
    data = tomllib.loads(out.read_text())
    assert data["store_dir"] == str(store) and data["node_name"]
    assert 0 < data["min_free_gb"] <= 5.0 and 0 <= data["staging_keep_recent_gb"] <= 40.0
    assert data["runner"]["decode_concurrency"] in (4, 8)
    assert neuron_cli.main(["check", "-c", str(out)]) == 0
    assert f"store      {store}" in capsys.readouterr().out
    config = NeuronConfig.from_file(out)
    assert config.restart == NeuronConfig().restart and config.load == ()


@pytest.mark.parametrize("command", ["cortex", "neuron"])
def test_init_refuses_to_overwrite_without_force(tmp_path: Path, command: str) -> None:
    """An existing file is left alone (exit 2), replaced with --force."""
    out = tmp_path / f"{command}.toml"
    out.write_text("# mine\n")
    main = cortex_cli.main if command == "cortex" else neuron_cli.main
    assert main(["init", "-o", str(out)]) == 2
    assert out.read_text() == "# mine\n"
    assert main(["init", "-o", str(out), "--force"]) == 0
    assert out.read_text().startswith(f"# {command}.toml: written by")


def test_render_sets_values_and_comments_the_rest() -> None:
    """Values by tomli-w, the others commented at their default, arrays as [[tables]]."""
    text = render(
        NeuronConfig,
        {"port": 1234, "admission.max_queue": 2, "load": [{"model_id": "m", "source": "d"}]},
        header="head",
    )
    data = tomllib.loads(text)
    assert data == {
        "port": 1234,
        "runner": {},
        "admission": {"max_queue": 2},
        "restart": {},
        "load": [{"model_id": "m", "source": "d"}],
    }
    assert "# heartbeat_s = 1.0" in text and "# node_name = ..." in text


def _serve(tmp_path: Path, argv: list[str], port: int) -> None:
    log = (tmp_path / f"{argv[0]}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", f"{argv[0]}.cli", *argv[1:]],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / f"{argv[0]}.log").read_text())
        try:
            return http_json(f"http://127.0.0.1:{port}/health", timeout=2)[0] in (200, 503)
        except OSError:
            return False

    try:
        wait_until(up, 60, f"{argv[0]} serve")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


def test_init_then_serve(tmp_path: Path) -> None:
    """`serve` starts on the starters unchanged (neuron, then cortex in front of it)."""
    n = tmp_path / "neuron.toml"
    c = tmp_path / "cortex.toml"
    assert neuron_cli.main(["init", "-o", str(n), "--store-dir", str(tmp_path / "store")]) == 0
    neuron_port = tomllib.loads(n.read_text())["port"]
    _serve(tmp_path, ["neuron", "serve", "-c", str(n)], neuron_port)
    assert cortex_cli.main(["init", "-o", str(c)]) == 0
    _serve(tmp_path, ["cortex", "serve", "-c", str(c)], tomllib.loads(c.read_text())["port"])
