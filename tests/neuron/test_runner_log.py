"""Runner logs (store/logs/<model>.log): rotated by size keeping a count, and only
counted under the journals' free-space floor. Real files in a temporary directory."""

from __future__ import annotations

from pathlib import Path

from neuron.runner.runner_log import FLOOR_CHECK_BYTES, RunnerLog, log_files
from shared.journal import FileSettings

# More free space than any disk has: the floor is always under water.
HUGE = 1 << 62


def _log(tmp_path: Path, *, max_bytes: int = 100, keep: int = 2, floor: int = 0) -> RunnerLog:
    return RunnerLog(FileSettings(tmp_path / "m.log", max_bytes, keep, floor))


def test_rotates_at_line_ends_keeping_a_bounded_count(tmp_path: Path) -> None:
    log = _log(tmp_path)
    lines = [f"line {i:03d} ".encode() + b"x" * 20 + b"\n" for i in range(40)]  # 30 bytes each
    for i in range(0, len(lines), 3):
        log.write(b"".join(lines[i : i + 3]))  # chunks that end mid-file
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.log", "m.log.1", "m.log.2"], names  # never a .3: keep = 2
    kept = b"".join((tmp_path / n).read_bytes() for n in ("m.log.2", "m.log.1", "m.log"))
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert len(data) <= 100 and data.endswith(b"\n"), (name, data)
    # What is kept is the newest output, whole lines in order.
    assert kept == b"".join(lines[-len(kept.splitlines()) :])


def test_a_line_longer_than_a_file_is_cut_and_an_existing_file_is_continued(
    tmp_path: Path,
) -> None:
    (tmp_path / "m.log").write_bytes(b"earlier\n")
    log = _log(tmp_path, max_bytes=50, keep=3)
    log.write(b"more\n")
    assert (tmp_path / "m.log").read_bytes() == b"earlier\nmore\n"  # appended to
    log.write(b"y" * 120)
    log.close()
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    # The lines before stay whole in their file; the long line fills files of 50 bytes.
    assert (tmp_path / "m.log.3").read_bytes() == b"earlier\nmore\n"
    assert sizes == {"m.log.3": 13, "m.log.2": 50, "m.log.1": 50, "m.log": 20}, sizes


def test_under_the_floor_it_only_counts_then_writes_again(tmp_path: Path) -> None:
    log = _log(tmp_path, floor=HUGE)
    log.write(b"lost\n")
    assert log.counting_only and log.dropped_bytes == 5
    assert not (tmp_path / "m.log").exists()
    # The disk has room again (a lower floor stands for freed space); the floor is
    # looked at again after FLOOR_CHECK_BYTES, so this write is still counted.
    log.settings = FileSettings(tmp_path / "m.log", 10 * FLOOR_CHECK_BYTES, 2, 1)
    log.write(b"z" * FLOOR_CHECK_BYTES)
    log.write(b"kept\n")
    log.close()
    assert not log.counting_only
    assert (tmp_path / "m.log").read_bytes().endswith(b"kept\n")


def test_a_write_error_stops_the_writing_not_the_caller(tmp_path: Path) -> None:
    log = RunnerLog(FileSettings(tmp_path / "missing" / "m.log", 100, 2, HUGE))
    log.write(b"a\n")  # the floor's statvfs of a missing directory fails: no raise
    assert log.error is not None and log.dropped_bytes == 2
    log.write(b"b\n")
    assert log.dropped_bytes == 2  # no longer tried
    assert log.status()["error"] == log.error


def test_log_files_groups_each_models_log_with_its_rotated_copies(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"1234")
    (tmp_path / "a.log.1").write_bytes(b"12")
    (tmp_path / "b.log").write_bytes(b"1")
    (tmp_path / "b.group").mkdir()  # a group's hostfile directory: not a log
    (tmp_path / "notes.txt").write_bytes(b"x")
    listed = log_files(tmp_path)
    assert [(e["name"], e["bytes"]) for e in listed] == [("a.log", 6), ("b.log", 1)]
    assert [f["name"] for f in listed[0]["files"]] == ["a.log", "a.log.1"]
    assert log_files(tmp_path / "none") == []
