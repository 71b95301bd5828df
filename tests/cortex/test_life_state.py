"""Holds kept across restarts: the lifecycle's state file (no network)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cortex.config import CortexConfig
from cortex.core.state import Fleet
from cortex.run.lifecycle import Lifecycle
from shared.catalogue import Catalogue


def _life(path: Path) -> Lifecycle:
    return Lifecycle(
        fleet=Fleet.of([("a", "http://a")], threshold=1),
        catalogue=Catalogue(models=()),
        config=CortexConfig(),
        state_file=str(path),
    )


def test_a_hold_is_written_and_read_back(tmp_path: Path) -> None:
    """A hold is in the file at once; a new lifecycle reads it; a release empties it."""
    path = tmp_path / "state" / "cortex-state.json"
    first = _life(path)
    hold = first.hold("m", "forced unload")
    assert json.loads(path.read_text())["holds"] == {"m": hold.to_json()}
    again = _life(path)
    again.restore()
    assert again.held("m") == hold
    again.release("m")
    assert json.loads(path.read_text())["holds"] == {}
    assert [p.name for p in path.parent.iterdir()] == ["cortex-state.json"]  # no temp left


@pytest.mark.parametrize("text", ["{not json", '{"version": 99}', '{"version": 1, "holds": [1]}'])
def test_a_corrupt_file_is_one_log_line_and_no_holds(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A start never fails on the state file: one error line, nothing held."""
    path = tmp_path / "cortex-state.json"
    path.write_text(text)
    life = _life(path)
    with caplog.at_level(logging.ERROR, logger="cortex.run.lifecycle"):
        life.restore()
    assert life.lives() == {}
    assert len(caplog.records) == 1 and str(path) in caplog.records[0].getMessage()


def test_no_file_yet_is_nothing_held(tmp_path: Path) -> None:
    """A first start: no file, no holds, no complaint."""
    life = _life(tmp_path / "absent.json")
    life.restore()
    assert life.lives() == {}


def test_state_file_defaults_beside_the_journal_or_the_config(tmp_path: Path) -> None:
    """Unset: in journal_dir when there is one, else beside cortex.toml; relative to it."""
    (tmp_path / "models.toml").write_text("")
    cfg = tmp_path / "cortex.toml"
    cfg.write_text("")
    assert CortexConfig.from_file(cfg).state_file == str(tmp_path / "cortex-state.json")
    cfg.write_text('journal_dir = "j"\n')
    assert CortexConfig.from_file(cfg).state_file == str(tmp_path / "j" / "cortex-state.json")
    cfg.write_text('state_file = "s/holds.json"\n')
    assert CortexConfig.from_file(cfg).state_file == str(tmp_path / "s" / "holds.json")
