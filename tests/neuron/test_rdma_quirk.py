"""The jaccl RDMA queue-pair quirk: recognised in a rank's output, counted against the budget."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import aiohttp

from neuron.config import RunnerConfig
from neuron.runner.rdma_quirk import classify, quirk_errno
from tests.conftest import InProcessFactory
from tests.support.waiting import until


def test_the_quirk_errnos_are_recognised_in_their_usual_spellings() -> None:
    assert quirk_errno("ibv_create_qp failed: errno 16 (Device or resource busy)") == 16
    assert quirk_errno("[jaccl] connect: errno=96") == 96
    assert quirk_errno("OSError: [Errno 2] No such file or directory") == 2
    assert quirk_errno("ibv_modify_qp: EBUSY") == 16
    assert quirk_errno("errno 12 (Cannot allocate memory)") is None
    assert quirk_errno("listening on port 16; 96 layers; 2 ranks") is None


def test_only_jaccl_ranks_are_classified() -> None:
    tail = "ibv_create_qp failed: errno 16"
    advice = classify("jaccl", 1, tail)
    assert advice is not None and "RDMA queue-pair quirk (errno 16 in rank 1's stderr)" in advice
    assert "reboot" in advice
    assert classify("ring", 1, tail) is None
    assert classify("jaccl", 1, "Traceback: KeyError: 'model.layers.3'") is None


def _fake_rank(tmp_path: Path, line: str) -> str:
    """A runner executable that dies as a jaccl rank does on a degraded queue pair."""
    path = tmp_path / "rank.sh"
    path.write_text(f"#!/bin/sh\necho '{line}' >&2\nexit 1\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _jaccl_group(group_id: str) -> dict[str, Any]:
    return {
        "group_id": group_id,
        "rank": 0,
        "world_size": 2,
        "backend": "jaccl",
        "sharding": "tensor",
        "coordinator": "127.0.0.1:47999",
        "ibv_devices": [[None, "rdma_en2"], ["rdma_en2", None]],
    }


async def _failed(session: aiohttp.ClientSession, base: str, model_id: str) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def failed() -> dict[str, Any] | None:
        nonlocal last
        async with session.get(f"{base}/models") as r:
            models = {m["model_id"]: m for m in (await r.json())["models"]}
        last = dict(models.get(model_id, {}))
        return last if last.get("state") == "failed" else None

    failed_model = await until(
        failed,
        timeout=60,
        interval=0.1,
        what=f"{model_id} failed",
        seen=lambda: last or f"{model_id} not listed",
    )
    return dict(failed_model)


async def test_a_rank_dying_with_errno_16_names_the_quirk_and_counts_against_the_budget(
    neuron_app_factory: InProcessFactory, demo_model: Path, tmp_path: Path
) -> None:
    """A real neuron, a real runner process that dies: the model's error leads with the
    quirk and the advice; /health counts the jaccl load; a ring group is not counted."""
    runner = RunnerConfig(python=_fake_rank(tmp_path, "[jaccl] ibv_create_qp failed: errno 16"))
    server = await neuron_app_factory(runner=runner, jaccl_reload_budget=1)
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as s:
        for i in range(2):
            body = {"model_id": f"q{i}", "source": str(demo_model), "group": _jaccl_group(f"g{i}")}
            async with s.post(f"{base}/models/load", json=body) as r:
                assert r.status == 202, await r.text()
            m = await _failed(s, base, f"q{i}")
            assert m["error"].startswith(
                "likely the jaccl RDMA queue-pair quirk (errno 16 in rank 0's stderr)"
            ), m["error"]
            assert "ibv_create_qp failed: errno 16" in m["error"]  # the tail is still there
        ring = {
            **_jaccl_group("g-ring"),
            "backend": "ring",
            "hosts": ["127.0.0.1:1", "127.0.0.1:2"],
        }
        async with s.post(
            f"{base}/models/load", json={"model_id": "r", "source": str(demo_model), "group": ring}
        ) as r:
            assert r.status == 202, await r.text()
        m = await _failed(s, base, "r")
        assert "quirk" not in m["error"]
        async with s.get(f"{base}/health") as r:
            health = await r.json()
    assert health["jaccl_loads"] == 2 and health["jaccl_reload_budget"] == 1
