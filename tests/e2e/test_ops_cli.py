"""The operator commands against a real cortex, real neurons and real runners (subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import NeuronProcess, kill_pid, runner_pids, wait_until
from tests.e2e.conftest import CortexProcess


def _run(
    cwd: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={**base, **(env or {})},
    )


def test_version_on_both_commands(tmp_path: Path) -> None:
    for prog in ("cortex", "neuron"):
        done = _run(tmp_path, f"{prog}.cli", "--version")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{prog} ") and "mlx-lm " in done.stdout
        assert "python 3." in done.stdout


def test_neuron_discover_reports_this_node_without_a_server(tmp_path: Path) -> None:
    (tmp_path / "neuron.toml").write_text('store_dir = "store"\nnode_name = "studio-9"\n')
    done = _run(tmp_path, "neuron.cli", "discover", "-c", "neuron.toml", "--json")
    assert done.returncode == 0, done.stderr
    d = json.loads(done.stdout)
    assert d["node_name"] == "studio-9" and d["store_dir"] == str(tmp_path / "store")
    assert d["mlx_version"] and d["mlx_lm_version"] and d["python_version"].startswith("3.")
    assert d["disk_total_bytes"] >= d["disk_free_bytes"] > 0
    assert d["jaccl_reload_budget"] == 20
    table = _run(tmp_path, "neuron.cli", "discover", "-c", "neuron.toml")
    assert table.returncode == 0 and "studio-9" in table.stdout and "mlx-lm" in table.stdout


def test_status_models_preview_load_doctor_unload_against_a_real_fleet(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str, tmp_path: Path
) -> None:
    """Every command once against live servers, each exit code meaning what it says;
    doctor passes a healthy fleet, then fails the right check for a wedged runner
    (SIGSTOP) and for a node that is down."""
    a: NeuronProcess = neuron_factory(name="a")
    b: NeuronProcess = neuron_factory(name="b")
    c: CortexProcess = cortex_factory(
        [("a", a), ("b", b)],
        [{"id": model_id, "source": str(demo_model), "aliases": ["tiny-ops"]}],
        doctor_probe_timeout_s=3.0,
    )
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 2, 30, "both nodes healthy")
    url = ("--url", c.url)

    preview = _run(tmp_path, "cortex.cli", "preview", model_id, *url)
    assert preview.returncode == 0, preview.stderr
    assert "arithmetic of a new copy (per node, never summed):" in preview.stdout
    assert "need " in preview.stdout and "usable " in preview.stdout

    load = _run(tmp_path, "cortex.cli", "load", model_id, "--nodes", "a", *url)
    assert load.returncode == 0, load.stderr
    assert f"{model_id} ready on a" in load.stdout

    # Serving on a: a reads 'here' (not 'no'), b can take one more copy, no pair is listed.
    served = _run(tmp_path, "cortex.cli", "preview", model_id, *url)
    assert served.returncode == 0, served.stdout + served.stderr
    rows = [line.split() for line in served.stdout.splitlines()]
    assert {r[0]: r[1] for r in rows if r and r[0] in ("a", "b", "a,b")} == {
        "a": "here",
        "b": "yes",
    }
    assert "on a now; one more copy fits on: b" in served.stdout

    # No flag at all: the URL from the environment.
    status = _run(tmp_path, "cortex.cli", "status", env={"CORTEX_URL": c.url})
    assert status.returncode == 0, status.stderr
    assert f"cortex {c.url}  ($CORTEX_URL)" in status.stdout
    row = next(line for line in status.stdout.splitlines() if line.startswith(model_id))
    assert " ready " in row and "a:ready" in row and "1 (on demand)" in row
    as_json = json.loads(_run(tmp_path, "cortex.cli", "status", "--json", *url).stdout)
    assert [n["name"] for n in as_json["nodes"]] == ["a", "b"]
    assert as_json["nodes"][0]["disk_free_bytes"] > 0

    # From the config file: its port.
    models = _run(tmp_path, "cortex.cli", "models", "-c", str(c.dir / "cortex.toml"))
    assert models.returncode == 0, models.stderr
    assert "tiny-ops" in models.stdout and "a:ready" in models.stdout

    doctor = _run(tmp_path, "cortex.cli", "doctor", *url)
    assert doctor.returncode == 0, doctor.stdout
    assert (
        "PASS  model answers" in doctor.stdout
        and f"{model_id} on a: 2-token probe" in doctor.stdout
    )
    assert "FAIL" not in doctor.stdout

    # A wedged runner: alive, silent. The neuron's heartbeat finds it stalled within a
    # second (then replaces it), or the probe gives up: either way the replica is named.
    (pid,) = runner_pids(model_id)
    kill_pid(pid, signal.SIGSTOP)
    try:
        wedged = _run(tmp_path, "cortex.cli", "doctor", "--json", *url)
    finally:
        kill_pid(pid, signal.SIGCONT)
    assert wedged.returncode == 1, wedged.stdout
    fails = [x for x in json.loads(wedged.stdout)["checks"] if x["verdict"] == "fail"]
    # The probe's failure names node a; or, when the heartbeat was first, the "model
    # served" check (no node of its own) says a's replica is stalled.
    assert fails and all(x["model"] == model_id for x in fails), fails
    assert all(x["node"] == "a" or "a: stalled" in x["detail"] for x in fails), fails
    assert {x["name"] for x in fails} <= {"model answers", "model served"}, fails

    unload = _run(tmp_path, "cortex.cli", "unload", model_id, *url)
    assert unload.returncode == 0, unload.stderr
    assert f"{model_id} unloaded from a" in unload.stdout
    gone = _run(tmp_path, "cortex.cli", "unload", model_id, *url)
    assert gone.returncode == 2 and "loaded nowhere" in gone.stderr

    b.stop()
    down = _run(tmp_path, "cortex.cli", "doctor", *url)
    assert down.returncode == 1
    assert "FAIL  node answering" in down.stdout and "b at http" in down.stdout
    unhealthy = wait_until(
        lambda: (r := _run(tmp_path, "cortex.cli", "status", *url)).returncode == 1 and r,
        30,
        "status to see b down",
    )
    assert "DOWN" in unhealthy.stdout
    unreachable = _run(tmp_path, "cortex.cli", "status", "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 2 and "cannot reach cortex" in unreachable.stderr


def test_doctor_fails_a_real_store_under_its_floor(
    neuron_factory: Any, cortex_factory: Any, tmp_path: Path
) -> None:
    """A real neuron whose floor is above its disk's free space: doctor fails `store floor`."""
    a: NeuronProcess = neuron_factory(name="a")
    b: NeuronProcess = neuron_factory({"min_free_gb": 1e9}, name="b")
    c: CortexProcess = cortex_factory([("a", a), ("b", b)], [])
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 2, 30, "both nodes healthy")
    done = _run(tmp_path, "cortex.cli", "doctor", "--json", "--url", c.url)
    assert done.returncode == 1, done.stdout
    fails = [x for x in json.loads(done.stdout)["checks"] if x["verdict"] == "fail"]
    assert [(x["name"], x["node"]) for x in fails] == [("store floor", "b")]
    assert "floor 1000000000.0 GB: stages are refused" in fails[0]["detail"]
