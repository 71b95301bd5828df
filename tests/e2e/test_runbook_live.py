"""Issue 22 on a live pair: a real neuron with a real runner of the demo model, and a
real cortex in front of it (both in-process, one loop). The runbooks' checks:
`/health` has a version, admission limits and queue time per model (and cortex's
view passes them on), the opt-in `timing` object, and runner logs rotated and
shown in `/store/storage`."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from cortex.config import CortexConfig, NeuronRef
from cortex.http.app import create_app as create_cortex
from cortex.run.poller import POLLER, Poller
from neuron.config import AdmissionConfig, LoadEntry, RunnerConfig
from neuron.discovery import package_version
from neuron.http.timing import TIMING_HEADER
from shared.catalogue import Catalogue, ModelSpec
from tests.conftest import InProcessFactory
from tests.support.waiting import READY_TIMEOUT_S, until

# A runner log file this small rotates every few lines (each request notes one).
LOG_MAX_MB = 0.0002
LOG_KEEP = 2
TIMING_KEYS = {"queue_s", "ttft_s", "prompt_tps", "generation_tps"}


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "count to ten"}],
        "max_tokens": 24,
        **extra,
    }


async def _post(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any], timed: bool
) -> dict[str, Any]:
    headers = {TIMING_HEADER: "1"} if timed else {}
    async with s.post(url, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def _last_frame(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any], timed: bool
) -> dict[str, Any]:
    """The stream's usage frame (the last data frame before [DONE])."""
    headers = {TIMING_HEADER: "1"} if timed else {}
    async with s.post(url, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        raw = (await r.read()).decode()
    frames = [line[6:] for line in raw.split("\n") if line.startswith("data: {")]
    assert raw.rstrip().endswith("data: [DONE]"), raw[-300:]
    return dict(json.loads(frames[-1]))


def _check_timing(t: dict[str, Any], where: str) -> None:
    assert set(t) == TIMING_KEYS, (where, t)
    for k, v in t.items():
        assert v is None or (isinstance(v, float) and v >= 0), (where, k, v)
    assert t["ttft_s"] is not None and t["queue_s"] is not None, (where, t)
    print(f"{where}: timing {t}")


async def _timing_checks(s: aiohttp.ClientSession, curl: str, model: str) -> None:
    """Through cortex: `timing` only when asked, non-streamed and on the usage frame."""
    chat = f"{curl}/v1/chat/completions"
    plain = await _post(s, chat, _chat(model), timed=False)
    assert "timing" not in plain and "usage" in plain
    timed = await _post(s, chat, _chat(model), timed=True)
    _check_timing(timed["timing"], f"non-streamed (usage {timed['usage']})")
    stream = _chat(model, stream=True, stream_options={"include_usage": True})
    frame = await _last_frame(s, chat, stream, timed=False)
    assert "usage" in frame and "timing" not in frame, frame
    frame = await _last_frame(s, chat, stream, timed=True)
    assert "usage" in frame and frame["model"] == model
    _check_timing(frame["timing"], f"stream's usage frame (usage {frame['usage']})")


async def _admission_checks(
    s: aiohttp.ClientSession, nurl: str, curl: str, model: str, poller: Poller
) -> None:
    """`version` on both /health; limits and queue time on the neuron and in cortex."""
    async with s.get(f"{nurl}/health") as r:
        health = await r.json()
    assert list(health)[:2] == ["status", "version"], list(health)[:3]
    assert health["version"] == package_version()
    (mh,) = health["models"]
    assert (mh["max_in_flight"], mh["queue_max"]) == (3, 5), mh
    assert isinstance(mh["queue_wait_p50_s"], float), mh
    async with s.get(f"{nurl}/models") as r:
        (ms,) = (await r.json())["models"]
    assert (ms["max_in_flight"], ms["queue_max"]) == (3, 5), ms
    async with s.get(f"{curl}/health") as r:
        chealth = await r.json()
    assert chealth["version"] == package_version(), chealth
    await poller.poll_once()
    async with s.get(f"{curl}/admin/state") as r:
        state = await r.json()
    (seen,) = [m for n in state["nodes"] for m in n["models"] if m["model_id"] == model]
    assert (seen["max_in_flight"], seen["queue_max"]) == (3, 5), seen
    assert seen["queue_wait_p50_s"] == mh["queue_wait_p50_s"], seen
    print(
        f"neuron /health: status {health['status']} version {health['version']};"
        f" {model}: max_in_flight {mh['max_in_flight']} queue_max {mh['queue_max']}"
        f" queue_wait_p50_s {mh['queue_wait_p50_s']}; cortex /health version"
        f" {chealth['version']}"
    )


async def _log_checks(s: aiohttp.ClientSession, nurl: str, model: str) -> None:
    """Runner logs rotated, at most LOG_KEEP old files, shown with their bytes."""
    async with s.get(f"{nurl}/store/storage") as r:
        storage = await r.json()
    logs = storage["runner_logs"]
    assert isinstance(storage["disk_free_bytes"], int)
    (entry,) = [e for e in logs["logs"] if e["name"] == f"{model}.log"]
    names = [f["name"] for f in entry["files"]]
    assert names[0] == f"{model}.log" and len(names) == 1 + LOG_KEEP, names
    assert all(f["bytes"] <= logs["max_bytes"] for f in entry["files"]), entry
    assert entry["bytes"] == sum(f["bytes"] for f in entry["files"]) > 0
    assert logs["keep"] == LOG_KEEP and logs["not_written"] == []
    print(f"runner logs: {[(f['name'], f['bytes']) for f in entry['files']]}")


async def test_version_admission_timing_and_runner_logs_on_a_live_pair(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    model = f"rb-{uuid.uuid4().hex[:6]}"
    neuron = await neuron_app_factory(
        runner=RunnerConfig(log_max_mb=LOG_MAX_MB, log_keep=LOG_KEEP),
        admission=AdmissionConfig(max_in_flight=3, max_queue=5),
        load=(LoadEntry(model_id=model, source=str(demo_model)),),
    )
    nurl = str(neuron.make_url("")).rstrip("/")
    config = CortexConfig(port=0, poll_interval_s=3600.0, neurons=(NeuronRef(name="a", url=nurl),))
    cat = Catalogue(models=(ModelSpec(id=model, source=str(demo_model)),))
    cortex_app = create_cortex(config, catalogue=cat, background=False)
    cortex = TestServer(cortex_app, port=0)
    await cortex.start_server()
    curl = str(cortex.make_url("")).rstrip("/")
    t0 = time.monotonic()
    try:
        async with aiohttp.ClientSession() as s:

            async def ready() -> bool:
                async with s.get(f"{nurl}/models") as r:
                    return any(m["state"] == "ready" for m in (await r.json())["models"])

            await until(ready, timeout=READY_TIMEOUT_S, interval=0.1, what=f"{model} ready")
            print(f"\nmodel ready in {time.monotonic() - t0:.2f} s")
            await cortex_app[POLLER].poll_once()
            await _timing_checks(s, curl, model)
            await _admission_checks(s, nurl, curl, model, cortex_app[POLLER])
            await _log_checks(s, nurl, model)
    finally:
        await cortex.close()
    print(f"whole check: {time.monotonic() - t0:.2f} s")
