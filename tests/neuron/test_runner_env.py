"""A runner's environment: MLX_METAL_FAST_SYNCH for jaccl groups, and a catalogue
model's `env` table checked at catalogue load and at the neuron's load, reaching its
runner and named in the node's event log (issue 22)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from neuron.runner.main import PARENT_ENV, SPLIT_ENV, WATCHDOG_ENV
from neuron.runner.process import FAST_SYNCH_ENV, group_env, runner_env
from shared.catalogue import Catalogue
from shared.config import ConfigError
from shared.runner_options import ENV_RESERVED, OptionError, RunnerOptions
from shared.wire import FieldError, GroupSpec, LoadRequest
from tests.conftest import runner_pids, wait_until
from tests.e2e.conftest import CortexProcess
from tests.support.clients import chat

JACCL = GroupSpec("g", 1, 2, "jaccl", "pipeline", coordinator="10.0.0.1:5000", layer_split=(1, 1))
RING = GroupSpec("g", 0, 2, "ring", "tensor", hosts=("h:1", "h:2"))
BAD_ENV: list[tuple[dict[str, Any], str]] = [
    ({"lower": "1"}, "is not a variable name"),
    ({"1ABC": "1"}, "is not a variable name"),
    ({"MLX_RANK": "0"}, "env.MLX_RANK is set by the neuron"),
    ({"MLX_JACCL_COORDINATOR": "evil:1"}, "set by the neuron"),
    ({"LD_PRELOAD": "/tmp/x.so"}, "env.LD_PRELOAD is refused"),
    ({"PYTHONPATH": "/tmp"}, "is refused"),
    ({"PYTHONHOME": "/tmp"}, "is refused"),
    ({"PATH": "/tmp"}, "env.PATH is refused"),
    ({"DYLD_INSERT_LIBRARIES": "/x"}, "is refused"),
    ({"OK": 1}, "must be a string"),
]


def test_jaccl_group_gets_fast_synch() -> None:
    env = group_env(JACCL, Path("/g"))
    assert env[FAST_SYNCH_ENV] == "1"
    assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:5000"
    assert FAST_SYNCH_ENV not in group_env(RING, Path("/g"))
    # The model's env overrides the default, never the group's own variables.
    added = runner_env(JACCL, Path("/g"), {FAST_SYNCH_ENV: "0", "MLX_FOO": "x"})
    assert added[FAST_SYNCH_ENV] == "0" and added["MLX_FOO"] == "x"
    assert added["MLX_RANK"] == "1" and added[PARENT_ENV]


def test_reserved_names_cover_what_the_neuron_sets() -> None:
    """shared cannot import the neuron: this keeps its reserved list in step."""
    ours = set(group_env(JACCL, Path("/g"))) | set(group_env(RING, Path("/g")))
    ours |= {PARENT_ENV, WATCHDOG_ENV, SPLIT_ENV}
    assert ours - {FAST_SYNCH_ENV} <= ENV_RESERVED


@pytest.mark.parametrize(("env", "why"), BAD_ENV)
def test_bad_env_refused_at_catalogue_load(tmp_path: Path, env: dict[str, Any], why: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(tomli_w.dumps({"models": [{"id": "m", "source": "org/m", "env": env}]}))
    with pytest.raises((ConfigError, OptionError)) as exc:
        Catalogue.load(path)
    print(exc.value)
    assert why in str(exc.value) or "must be str" in str(exc.value)


@pytest.mark.parametrize(("env", "why"), BAD_ENV)
def test_bad_env_refused_at_neuron_load(env: dict[str, Any], why: str) -> None:
    with pytest.raises(FieldError) as exc:
        LoadRequest.from_json({"model_id": "m", "source": "/x", "options": {"env": env}})
    assert exc.value.param.startswith("options.env"), exc.value.param
    assert why.removeprefix("env.MLX_RANK ").removeprefix("env.") in str(exc.value)


def test_env_on_an_embedding_model_is_allowed() -> None:
    RunnerOptions(env={"OMP_NUM_THREADS": "1"}).check_for(kind="embedding")


def test_catalogue_env_reaches_the_runner_and_events(
    tmp_path: Path, demo_model: Path, neuron_factory: Any
) -> None:
    """cortex loads the demo model with its catalogue env; the runner process has it,
    the neuron's event log names it, and a bad env sent to the neuron is refused."""
    t0 = time.monotonic()
    neuron = neuron_factory()
    env = {
        "MLX_METAL_FAST_SYNCH": "0",
        "FLEET_TEST_SETTING": "hello world",
        "HF_TOKEN": "hf_not_for_logs",
    }
    models = [{"id": "envd", "source": str(demo_model), "keep_loaded": True, "env": env}]
    cortex = CortexProcess.write(tmp_path / "cortex", [("n1", neuron)], models).start()
    try:
        neuron.wait_state("envd", "ready")
        (pid,) = runner_pids("envd")
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        seen = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
        assert {k: seen.get(k) for k in env} == env
        _, events = neuron.get("/events")
        starts = [e for e in events["events"] if e["kind"] == "runner start"]
        print("runner start event:", starts[-1]["detail"])
        assert "FLEET_TEST_SETTING=hello world" in starts[-1]["detail"]
        assert "MLX_METAL_FAST_SYNCH=0" in starts[-1]["detail"]
        # A value whose name looks secret is never shown, in the events or a trace.
        assert "HF_TOKEN=***" in starts[-1]["detail"]
        assert "hf_not_for_logs" not in json.dumps(events)
        rid = "env-trace-1"
        req = urllib.request.Request(
            neuron.url + "/v1/chat/completions",
            data=json.dumps(chat("envd", text="hi", max_tokens=2)).encode(),
            headers={"Content-Type": "application/json", "X-Request-Id": rid},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200
        trace = wait_until(lambda: neuron.get(f"/traces/{rid}")[1].get("runner_env"), 30, rid)
        assert "MLX_METAL_FAST_SYNCH=0" in trace and "HF_TOKEN=***" in trace
        body = {
            "model_id": "bad",
            "source": str(demo_model),
            "options": {"env": {"LD_PRELOAD": "x"}},
        }
        status, answer = neuron.post("/models/load", body)
        print("neuron load with LD_PRELOAD:", status, answer["error"]["message"])
        assert status == 400 and answer["error"]["param"] == "options.env.LD_PRELOAD"
    finally:
        cortex.stop()
    print(f"env e2e took {time.monotonic() - t0:.1f} s")
