"""cortex.cli.remote: which cortex a command means, in the documented order."""

from __future__ import annotations

import argparse
from pathlib import Path

from cortex.cli.remote import DEFAULT_URL, ApiFailure, resolve, table


def _args(**kw: str | None) -> argparse.Namespace:
    return argparse.Namespace(url=kw.get("url"), token=kw.get("token"), config=kw.get("config"))


def test_flags_beat_the_environment_which_beats_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "cortex.toml"
    conf.write_text('host = "0.0.0.0"\nport = 9555\nadmin_token = "file-token-123"\n')
    env = {"CORTEX_URL": "http://env:1/", "CORTEX_ADMIN_TOKEN": "env-token-123"}
    t = resolve(_args(url="http://flag:2", token="flag-token", config=str(conf)), env, tmp_path)
    assert (t.url, t.token, t.source) == ("http://flag:2", "flag-token", "--url")
    t = resolve(_args(config=str(conf)), env, tmp_path)
    assert (t.url, t.token, t.source) == ("http://env:1", "env-token-123", "$CORTEX_URL")
    t = resolve(_args(config=str(conf)), {}, tmp_path)
    # Listening on every address: reached on loopback.
    assert (t.url, t.token) == ("http://127.0.0.1:9555", "file-token-123")
    assert t.headers == {"Authorization": "Bearer file-token-123"}


def test_without_anything_the_local_fleet_of_make_run_then_the_default(tmp_path: Path) -> None:
    assert resolve(_args(), {}, tmp_path).url == DEFAULT_URL
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cortex.toml").write_text('host = "127.0.0.1"\nport = 9470\n')
    t = resolve(_args(), {}, tmp_path)
    assert (t.url, t.token) == ("http://127.0.0.1:9470", None)
    assert t.source.endswith("run/cortex.toml")


def test_table_pads_columns() -> None:
    assert table(["A", "BB"], [["xyz", "1"]]).splitlines() == ["A    BB", "xyz  1"]


def test_an_error_answer_exits_by_whose_mistake_it_is() -> None:
    """The caller's (a bad token, an unknown name, a malformed ask): 2; a refusal on the
    merits (a placement that does not fit, a kept model): 1."""
    bad = {"error": {"message": "'nodes' must be an array", "code": "invalid_request"}}
    assert ApiFailure.of(400, bad).exit_code == 2
    assert ApiFailure.of(404, {"error": {"message": "no such model"}}).exit_code == 2
    assert ApiFailure.of(401, "unauthorized").exit_code == 2
    refused = {"error": {"message": "cannot place", "code": "placement_refused"}}
    failure = ApiFailure.of(400, refused)
    assert (failure.exit_code, failure.code, str(failure)) == (
        1,
        "placement_refused",
        "400: cannot place",
    )
    assert ApiFailure.of(409, {"error": {"code": "model_kept_loaded"}}).exit_code == 1
