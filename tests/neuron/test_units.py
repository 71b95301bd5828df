"""Neuron parts that need no runner: config, group env, admission, store, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from neuron.config import NeuronConfig
from neuron.runner.admission import Admission
from neuron.runner.main import strip_marker
from neuron.runner.process import group_env, hostfile_json, runner_argv
from neuron.store.sources import Store, check_model_dir, is_local_source
from shared.config import ConfigError
from shared.errors import InvalidModelPath, QueueFull
from shared.wire import GroupSpec, NodeHealth
from tests.conftest import InProcessFactory
from tests.support.waiting import until


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "neuron.toml"
    p.write_text(text)
    return p


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    """An almost empty file gives the defaults; relative paths follow the file."""
    cfg = NeuronConfig.from_file(
        write(tmp_path, 'store_dir = "st"\n[[load]]\nmodel_id = "m"\nsource = "./models/m"\n')
    )
    assert cfg.port == 9410 and cfg.host == "127.0.0.1"
    assert cfg.store_path == tmp_path / "st"
    assert cfg.load[0].source == str(tmp_path / "models" / "m")
    assert cfg.runner.warmup_deadline_s == 300.0
    assert cfg.heartbeat_s == 1.0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("prot = 1\n", "prot"),
        ('port = "9410"\n', "port"),
        ("[admission]\nmax_inflight = 3\n", "admission.max_inflight"),
        ("[runner]\ndecode_concurrency = 1.5\n", "runner.decode_concurrency"),
        ('[[load]]\nmodel_id = "m"\n', "load[0].source"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """An unknown, mistyped or missing key is an error naming it and the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        NeuronConfig.from_file(path)
    assert key in str(exc.value)
    assert str(path) in str(exc.value)


def test_serve_reports_config_errors(tmp_path: Path) -> None:
    """`neuron serve` with a bad file exits 2 and names the key."""
    path = write(tmp_path, "[admission]\nmax_queue = -1\nbogus = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "neuron.cli", "serve", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "admission.bogus" in r.stderr


def test_cli_help_says_demo_model_is_noise() -> None:
    """The demo-model help warns that it produces noise, not language."""
    r = subprocess.run(
        [sys.executable, "-m", "neuron.cli", "demo-model", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    assert "noise, not language" in " ".join(r.stdout.split())


def test_group_env_ring_and_jaccl(tmp_path: Path) -> None:
    """A GroupSpec becomes MLX_RANK plus a hostfile (ring) or coordinator (jaccl)."""
    assert group_env(None, tmp_path) == {}
    ring = GroupSpec("g", 1, 2, "ring", "tensor", hosts=("10.0.0.1:5000", "10.0.0.2:5000"))
    env = group_env(ring, tmp_path)
    assert env["MLX_RANK"] == "1"
    assert env["MLX_HOSTFILE"] == str(tmp_path / "hostfile.json")
    assert json.loads(hostfile_json(ring)) == [["10.0.0.1:5000"], ["10.0.0.2:5000"]]
    jaccl = GroupSpec(
        "g",
        0,
        2,
        "jaccl",
        "tensor",
        coordinator="10.0.0.1:6000",
        ibv_devices=((None, "rdma_en2"), ("rdma_en2", None)),
    )
    env = group_env(jaccl, tmp_path)
    assert env["MLX_RANK"] == "0"
    assert env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:6000"
    assert env["MLX_IBV_DEVICES"] == str(tmp_path / "ibv_devices.json")
    assert "MLX_HOSTFILE" not in env
    assert "NEURON_PIPELINE_SPLIT" not in env


def test_group_env_carries_pipeline_split(tmp_path: Path) -> None:
    """A pipeline rank is told cortex's per-rank layer counts."""
    group = GroupSpec("g", 0, 2, "ring", "pipeline", hosts=("a:1", "b:1"), layer_split=(23, 7))
    assert group_env(group, tmp_path)["NEURON_PIPELINE_SPLIT"] == "23,7"


def test_runner_argv_marks_model_and_pipeline() -> None:
    """The runner command carries the model-id marker, which the shim strips."""
    cfg = NeuronConfig()
    group = GroupSpec("g", 0, 2, "ring", "pipeline", hosts=("a:1", "b:1"))
    argv = runner_argv(cfg.runner, "m1", Path("/models/m1"), 1234, group)
    assert argv[1:5] == ["-m", "neuron.runner.main", "--neuron-model-id", "m1"]
    assert "--pipeline" in argv
    assert strip_marker(argv[3:]) == argv[5:]


async def test_admission_caps_queues_and_times_out() -> None:
    """Slots are capped, waiters queue FIFO up to a bound, and time out."""
    # A queue timeout that never ends while the test holds the slot...
    a = Admission(max_in_flight=1, max_queue=1, queue_timeout_s=600.0)
    order: list[str] = []
    async with a.slot():
        assert a.in_flight == 1

        async def waiter() -> None:
            async with a.slot():
                order.append("queued ran")

        task = asyncio.create_task(waiter())
        await until(
            lambda: a.queue_depth >= 1,
            interval=0,
            what="a queued waiter",
            seen=lambda: a.queue_depth,
        )
        with pytest.raises(QueueFull):
            async with a.slot():
                pass
        order.append("holder done")
    await task
    assert order == ["holder done", "queued ran"]
    assert a.in_flight == 0 and a.queue_depth == 0

    # ...and one that does.
    b = Admission(max_in_flight=1, max_queue=1, queue_timeout_s=0.2)
    async with b.slot():
        with pytest.raises(QueueFull, match="waited"):
            async with b.slot():
                pass
    assert b.in_flight == 0 and b.queue_depth == 0


async def test_admission_cancelled_waiter_frees_its_place() -> None:
    """A queued request that is cancelled leaves the queue."""
    a = Admission(max_in_flight=1, max_queue=1, queue_timeout_s=10)
    async with a.slot():
        task = asyncio.create_task(a.slot().__aenter__())
        await until(
            lambda: a.queue_depth >= 1,
            interval=0,
            what="a queued waiter",
            seen=lambda: a.queue_depth,
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert a.queue_depth == 0
    assert a.in_flight == 0


def test_store_checks_paths_and_stages(tmp_path: Path) -> None:
    """Local sources must be model dirs; hub names are not local."""
    assert is_local_source("/abs/path") and is_local_source("./rel")
    assert not is_local_source("mlx-community/Llama-3.2-1B-Instruct-4bit")
    with pytest.raises(InvalidModelPath, match="does not exist"):
        check_model_dir(str(tmp_path / "nope"))
    with pytest.raises(InvalidModelPath, match=r"no config\.json"):
        check_model_dir(str(tmp_path))
    store = Store(tmp_path / "store")
    store.ensure()
    used = store.models_dir / "a"
    used.mkdir()
    (used / "config.json").write_text("{}")
    (store.models_dir / "b").mkdir()
    assert [(c.name, c.in_use) for c in store.staged([used])] == [("a", True), ("b", False)]
    assert [c.name for c in store.purge([used])] == ["b"]
    assert [c.name for c in store.staged([])] == ["a"]


async def test_in_process_neuron_answers_without_models(
    neuron_app_factory: InProcessFactory,
) -> None:
    """An in-process neuron with no models is idle and lists nothing."""
    server = await neuron_app_factory()
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/health")) as r:
            health = NodeHealth.from_json(await r.json())
        async with s.get(server.make_url("/models")) as r:
            models = await r.json()
        async with s.get(server.make_url("/nowhere")) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
    assert health.status == "idle" and health.models == ()
    assert models == {"models": []}
