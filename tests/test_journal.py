"""shared.journal: the ring, the rotated JSONL file, and counting-only under the floor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cortex.config import CortexConfig
from neuron.config import NeuronConfig
from shared.journal import MB, Event, FileSettings, Journal, journal_health


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ring_is_bounded_and_seq_keeps_rising() -> None:
    j = Journal[Event](ring=5)
    for i in range(12):
        j.append(Event(kind="k", model=f"m{i}"))
    assert len(j) == 5
    assert [e.seq for e in j] == [8, 9, 10, 11, 12]
    assert j.last_seq == 12
    assert [e.model for e in j.since(10)] == ["m10", "m11"]
    assert j.status() == "memory only"
    assert j.append(Event(kind="x")).to_json().keys() == {
        "seq",
        "ts",
        "kind",
        "model",
        "node",
        "detail",
    }


def test_file_rotates_by_size_keeping_a_bounded_count_of_valid_jsonl(tmp_path: Path) -> None:
    s = FileSettings(tmp_path / "events.jsonl", max_bytes=2000, keep=3, min_free_bytes=0)
    j = Journal[Event](ring=10, settings=s)
    for i in range(400):
        j.append(Event(kind="state", model="m", node="a", detail=f"line {i} " + "x" * 40))
    assert j.file is not None
    j.file.flush()
    j.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    # Far more than 4 files' worth were written: only the live one and 3 rotated remain.
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    seqs: list[int] = []
    for name in ["events.jsonl.3", "events.jsonl.2", "events.jsonl.1", "events.jsonl"]:
        path = tmp_path / name
        assert path.stat().st_size <= 2000
        recs = _lines(path)  # every line whole JSON
        assert recs and all(r["kind"] == "state" and r["node"] == "a" for r in recs)
        seqs += [int(str(r["seq"])) for r in recs]
    # Oldest file to newest: consecutive seqs ending at the last record, nothing lost
    # inside what is kept.
    assert seqs == list(range(seqs[0], 401))
    assert seqs[0] > 1
    assert j.file.dropped == 0 and j.file.written == 400


def test_under_the_floor_it_only_counts_and_says_so(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    s = FileSettings(tmp_path / "traces.jsonl", max_bytes=MB, keep=2, min_free_bytes=free + 10**12)
    j = Journal[Event](ring=100, settings=s)
    for _ in range(25):
        j.append(Event(kind="k"))
    assert j.file is not None
    j.file.flush()
    assert not (tmp_path / "traces.jsonl").exists()
    assert j.file.dropped == 25 and j.file.counting_only
    assert len(j) == 25  # the ring still works
    assert j.status().startswith("counting-only, 25 dropped")
    health = journal_health({"events": j, "other": Journal[Event]()})
    assert health["journal"] == "counting-only, 25 dropped"
    assert health["journal_files"]["other"] == "memory only"
    j.close()


def test_back_above_the_floor_it_writes_again(tmp_path: Path) -> None:
    """The floor is checked per batch: a journal that counted resumes writing."""
    free = shutil.disk_usage(tmp_path).free
    path = tmp_path / "events.jsonl"
    s = FileSettings(path, max_bytes=MB, keep=2, min_free_bytes=free + 10**12)
    j = Journal[Event](settings=s)
    j.append(Event(kind="dropped"))
    assert j.file is not None
    j.file.flush()
    j.file.settings = FileSettings(path, max_bytes=MB, keep=2, min_free_bytes=0)
    j.append(Event(kind="written"))
    j.file.flush()
    assert [r["kind"] for r in _lines(path)] == ["written"]
    assert not j.file.counting_only and j.file.dropped == 1
    assert j.status() == f"writing {path}, 1 dropped"
    j.close()


def test_a_relative_journal_dir_is_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text("models = []\n")
    (tmp_path / "cortex.toml").write_text('journal_dir = "j"\njournal_keep = 2\n')
    (tmp_path / "neuron.toml").write_text('journal_dir = "nj"\nstore_dir = "s"\n')
    cortex = CortexConfig.from_file(tmp_path / "cortex.toml")
    neuron = NeuronConfig.from_file(tmp_path / "neuron.toml")
    assert cortex.journal_dir == str(tmp_path.resolve() / "j") and cortex.journal_keep == 2
    assert neuron.journal_dir == str(tmp_path.resolve() / "nj")
    assert CortexConfig().journal_dir is None and NeuronConfig().journal_dir is None
