"""The model store on real neurons over loopback: staging from peers and from a fake hub.

Peers are real neurons (subprocesses where a test kills one, in-process
otherwise) serving staged copies; the hub is a real aiohttp app serving the
routes huggingface_hub calls (`/api/models/{repo}/revision/{rev}`,
`/{repo}/resolve/{rev}/{file}`), reached through the neuron's `hub_endpoint`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from neuron.http.app import CONFIG, STAGER
from neuron.store.staging import StageJob, Stager
from tests.conftest import InProcessFactory, NeuronProcess
from tests.support.fake_hub import repo_info
from tests.support.waiting import until

TOKEN = "fleet-token-for-staging-0123456789"
REPO = "test-org/big-demo"
NAME = "test-org--big-demo"
BIG = 200 * 1024 * 1024


def _bearer(token: str | None = TOKEN) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The demo model plus a 200 MB file of random bytes (a transfer that takes a while)."""
    d = tmp_path_factory.mktemp("big-model") / "big"
    shutil.copytree(demo_model, d)
    with (d / "big.safetensors").open("wb") as f:
        for _ in range(BIG // (8 * 1024 * 1024)):
            f.write(os.urandom(8 * 1024 * 1024))
    return d


def _place_copy(store_dir: Path, model: Path, *, link: bool = False) -> Path:
    """A staged copy in a peer's store, as a finished stage leaves it."""
    target = store_dir / "models" / NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    copy: Any = os.link if link else shutil.copy2
    shutil.copytree(model, target, copy_function=copy)
    return target


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".neuron-")
    }


def _store(server: TestServer) -> Path:
    return server.app[CONFIG].store_path


def _tree_size(root: Path) -> int:
    return sum(f.stat().st_size for f in root.iterdir() if f.is_file())


def _stager(server: TestServer) -> Stager:
    return server.app[STAGER]


async def _post(
    server: TestServer, path: str, body: Any, token: str | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(str(server.make_url(path)), json=body, headers=_bearer(token)) as r,
    ):
        return r.status, await r.json(content_type=None)


async def _get(server: TestServer, path: str, token: str | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(str(server.make_url(path)), headers=_bearer(token)) as r,
    ):
        return r.status, await r.json(content_type=None)


async def _job(server: TestServer) -> StageJob:
    job = _stager(server).jobs.get(NAME)
    assert job is not None, "no stage job"
    return job


async def _fetched(job: StageJob, at_least: int) -> None:
    """Wait until the stage has fetched `at_least` bytes; fail if it stops first."""

    def far_enough() -> bool:
        assert job.active, job.error
        return job.bytes_done >= at_least

    await until(
        far_enough,
        timeout=120,
        interval=0.002,
        what=f"{at_least} bytes fetched",
        seen=lambda: f"{job.bytes_done} bytes fetched, state {job.state}",
    )


async def test_stage_from_peer_killed_halfway_resumes_from_another(
    neuron_factory: Any, neuron_app_factory: InProcessFactory, big_model: Path, tmp_path: Path
) -> None:
    """Peer A killed mid-file: peer B resumes with a Range, the copy is byte-identical."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    settings = {"fleet_token_file": str(token_file)}
    a: NeuronProcess = neuron_factory(settings, name="peer-a")
    b: NeuronProcess = neuron_factory(settings, name="peer-b")
    for p in (a, b):
        _place_copy(p.dir / "store", big_model, link=True)
    stager = await neuron_app_factory(fleet_token=TOKEN, min_free_gb=0)
    status, body = await _post(
        stager, "/store/stage", {"model_id": "big", "source": REPO, "peers": [a.url, b.url]}, TOKEN
    )
    assert status == 202, body
    job = await _job(stager)
    # big.safetensors is the first file, so peer A (the first peer) serves it.
    await _fetched(job, BIG // 5)
    at_kill = job.bytes_done
    a.process.send_signal(signal.SIGKILL)
    a.process.wait()
    assert at_kill < job.bytes_total  # type: ignore[operator]
    await asyncio.wait_for(job.finished.wait(), 120)
    assert job.state == "staged", job.error
    assert job.bytes_done == job.bytes_total
    # Resumed, not restarted: every byte crossed the network exactly once.
    assert job._fetched == job.bytes_total
    assert job.path is not None
    assert _tree_digest(job.path) == _tree_digest(big_model)
    status, st = await _get(stager, "/store/storage", TOKEN)
    assert NAME in [c["name"] for c in st["staged"]]
    assert st["partial"] == []


async def test_corrupted_byte_in_peer_file_fails_naming_it(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """A peer whose file rotted after its manifest was made: the stage fails naming the file."""
    peer = await neuron_app_factory(min_free_gb=0)
    copy = _place_copy(_store(peer), demo_model)
    status, manifest = await _get(peer, f"/store/models/{NAME}/manifest")
    assert status == 200 and {f["path"] for f in manifest["files"]} >= {"config.json"}
    victim = copy / "tokenizer.json"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    stager = await neuron_app_factory(min_free_gb=0)
    peer_url = str(peer.make_url("")).rstrip("/")
    status, _ = await _post(
        stager, "/store/stage", {"model_id": "m", "source": REPO, "peers": [peer_url]}
    )
    assert status == 202
    job = await _job(stager)
    await asyncio.wait_for(job.finished.wait(), 60)
    assert job.state == "failed"
    assert job.error is not None and "'tokenizer.json' failed verification" in job.error
    assert "sha256" in job.error
    assert job.task is not None
    await asyncio.wait({job.task})
    _, events = await _get(stager, "/events")
    assert [e["kind"] for e in events["events"]] == ["stage start", "stage failed"]
    assert "'tokenizer.json' failed verification" in events["events"][1]["detail"]
    store = _store(stager)
    assert not (store / "models" / NAME).exists()
    assert not (store / "models" / ".staging" / NAME / "tokenizer.json").exists()


async def test_load_stages_first_with_monotonic_progress(
    neuron_app_factory: InProcessFactory, big_model: Path
) -> None:
    """A load of a hub source stages from the peer (progress in /models), then runs."""
    peer = await neuron_app_factory(min_free_gb=0)
    _place_copy(_store(peer), big_model, link=True)
    node = await neuron_app_factory(min_free_gb=0)
    peer_url = str(peer.make_url("")).rstrip("/")
    status, body = await _post(
        node, "/models/load", {"model_id": "big", "source": REPO, "peers": [peer_url]}
    )
    assert status == 202, body
    job = await _job(node)
    seen: list[int] = []
    listed = None

    async def sampled_to_the_end() -> bool:
        nonlocal listed
        if not job.active:
            return True
        seen.append(job.bytes_done)
        if listed is None and job.state == "fetching":
            _, models = await _get(node, "/models")
            listed = models["models"][0]["staging"]
        return False

    await until(
        sampled_to_the_end,
        timeout=120,
        interval=0.002,
        what="the stage to end",
        seen=lambda: (job.state, job.bytes_done, job.bytes_total),
    )
    assert job.state == "staged", job.error
    seen.append(job.bytes_done)
    assert seen == sorted(seen)
    assert seen[-1] == job.bytes_total == _tree_size(big_model)
    assert listed is not None and listed["state"] == "fetching"
    assert listed["bytes_total"] == job.bytes_total and listed["rate_bytes_per_s"] is not None
    m: dict[str, Any] = {}

    async def ready() -> bool:
        nonlocal m
        _, models = await _get(node, "/models")
        m = models["models"][0]
        if m["state"] == "ready":
            return True
        assert m["state"] in ("loading", "warming"), m
        return False

    await until(ready, timeout=120, interval=0.2, what="big ready", seen=lambda: m)
    assert m["staging"] is None
    assert m["source"] == REPO
    _, events = await _get(node, "/events?model=big")
    kinds = [e["kind"] for e in events["events"]]
    assert kinds == ["stage start", "stage done", "runner start", "ready"], kinds


async def test_purge_during_stage_deletes_nothing_of_it(
    neuron_app_factory: InProcessFactory, big_model: Path
) -> None:
    """POST /store/purge-staging mid-stage removes an unused copy, nothing of the stage."""
    peer = await neuron_app_factory(min_free_gb=0)
    _place_copy(_store(peer), big_model, link=True)
    node = await neuron_app_factory(min_free_gb=0)
    old = _store(node) / "models" / "old-copy"
    old.mkdir(parents=True)
    (old / "w.bin").write_bytes(b"x" * 1000)
    peer_url = str(peer.make_url("")).rstrip("/")
    await _post(node, "/store/stage", {"model_id": "big", "source": REPO, "peers": [peer_url]})
    job = await _job(node)
    await _fetched(job, BIG // 10)
    status, out = await _post(node, "/store/purge-staging", {})
    assert status == 200
    assert [c["name"] for c in out["removed"]] == ["old-copy"]
    assert job.active  # still under way
    await asyncio.wait_for(job.finished.wait(), 120)
    assert job.state == "staged", job.error
    assert job.path is not None and _tree_digest(job.path) == _tree_digest(big_model)


async def test_budget_evicts_least_recently_used_never_in_use(
    neuron_app_factory: InProcessFactory, demo_model: Path, tmp_path: Path
) -> None:
    """At startup the LRU copies beyond the budget go (crash orphans too); a used one stays."""
    store = tmp_path / "budget-store"
    now = time.time()
    for i, name in enumerate(["oldest", "older", "newest"]):
        d = store / "models" / name
        d.mkdir(parents=True)
        (d / "w.bin").write_bytes(b"x" * 1000)
        os.utime(d, (now - 300 + 100 * i, now - 300 + 100 * i))
    orphan = store / "models" / ".staging" / "crashed"
    orphan.mkdir(parents=True)
    (orphan / "w.bin.part").write_bytes(b"x" * 500)
    os.utime(orphan, (now - 1000, now - 1000))
    used = store / "models" / "used"
    shutil.copytree(demo_model, used)
    os.utime(used, (now - 2000, now - 2000))
    # 2500 bytes: room for the two most recent 1000-byte copies, no more.
    node = await neuron_app_factory(store_dir=str(store), staging_keep_recent_gb=2.5e-6)
    left = sorted(p.name for p in (store / "models").iterdir() if not p.name.startswith("."))
    # "used" is the least recently used of all, so without a runner it goes too.
    assert left == ["newest", "older"]
    assert not orphan.exists()
    shutil.copytree(demo_model, used)
    status, body = await _post(node, "/models/load", {"model_id": "u", "source": str(used)})
    assert status == 202, body
    status, out = await _post(node, "/store/purge-staging", {})
    assert [c["name"] for c in out["removed"]] == ["newest", "older"]
    assert (used / "config.json").exists()  # in use: never purged
    status, _ = await _post(node, "/models/unload", {"model_id": "u"})
    assert status == 200
    # The runner stopped: the budget (smaller than this copy) now removes it.
    await until(
        lambda: not used.exists(),
        timeout=30,
        interval=0.05,
        what="the budget to remove a copy beyond it",
        seen=lambda: sorted(p.name for p in (store / "models").iterdir()),
    )


async def test_floor_refuses_a_stage_with_the_numbers(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """A stage that would cross min_free_gb: 507 with the arithmetic, no byte written."""
    peer = await neuron_app_factory(min_free_gb=0)
    _place_copy(_store(peer), demo_model)
    node = await neuron_app_factory(min_free_gb=1e9)  # a floor no disk clears
    peer_url = str(peer.make_url("")).rstrip("/")
    for path in ("/store/stage", "/models/load"):
        status, body = await _post(
            node, path, {"model_id": "m", "source": REPO, "peers": [peer_url]}
        )
        assert status == 507, body
        err = body["error"]
        assert err["code"] == "insufficient_storage"
        d = err["details"]
        assert d["floor_bytes"] == 10**18 and d["need_bytes"] > 0
        assert f"{d['free_bytes']} - {d['need_bytes']} = " in err["message"]
        assert "min_free_gb = 1e+09" in err["message"]
    staging = _store(node) / "models" / ".staging"
    assert not (staging / NAME).exists()


def test_peer_file_route_serves_only_manifest_files(demo_model: Path, tmp_path: Path) -> None:
    """Store.copy_file: traversal, hidden marks and unlisted files are never served."""
    from neuron.store.sources import Store

    store = Store(tmp_path / "s")
    store.ensure()
    copy = _place_copy(tmp_path / "s", demo_model)
    (tmp_path / "secret").write_text("no")
    assert store.copy_file(NAME, "config.json") == (copy / "config.json").resolve()
    store.manifest(NAME)
    (copy / "late.bin").write_text("added after the manifest")
    for bad in (
        "../../secret",
        "/etc/passwd",
        "./config.json",
        ".neuron-manifest.json",
        "late.bin",
        "a//b",
        "config.json/..",
    ):
        assert store.copy_file(NAME, bad) is None, bad
    assert store.copy_file("..", "secret") is None


async def test_file_route_rejects_encoded_traversal(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """Encoded `..` in the URL, an unknown copy: 404 over HTTP, Range answered 206."""
    peer = await neuron_app_factory(min_free_gb=0)
    _place_copy(_store(peer), demo_model)
    async with aiohttp.ClientSession() as s:
        base = str(peer.make_url(f"/store/models/{NAME}/files/"))
        for bad in ("%2e%2e/%2e%2e/neuron.toml", "..%2f..%2fnode_id"):
            async with s.get(base + bad) as r:
                assert r.status == 404, bad
        async with s.get(str(peer.make_url("/store/models/nope/manifest"))) as r:
            assert r.status == 404
        async with s.get(base + "config.json", headers={"Range": "bytes=2-5"}) as r:
            assert r.status == 206
            assert await r.read() == (demo_model / "config.json").read_bytes()[2:6]


# --- a fake hub -----------------------------------------------------------------


def _hub_digest(model: Path) -> dict[str, str]:
    """What a hub stage fetches: the files a runner needs (no README)."""
    return {k: v for k, v in _tree_digest(model).items() if k != "README.md"}


@pytest_asyncio.fixture
async def fake_hub(demo_model: Path) -> AsyncIterator[tuple[TestServer, dict[str, Any]]]:
    """The hub's metadata and file routes for REPO (the demo model); `stall` freezes files."""
    ctl: dict[str, Any] = {
        "stall_after": None,
        "release": asyncio.Event(),
        "sent": asyncio.Event(),
        "requests": [],
    }
    files = sorted(p for p in demo_model.iterdir() if p.is_file())  # noqa: ASYNC240

    async def info(request: web.Request) -> web.Response:
        return web.json_response(repo_info(REPO, files))

    async def resolve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        ctl["requests"].append((name, request.headers.get("Range")))
        path = demo_model / name
        if ctl["stall_after"] is not None and name == "model.safetensors":
            # Send a few bytes, then fall silent until released.
            resp = web.StreamResponse(
                status=200, headers={"Content-Length": str(path.stat().st_size)}
            )
            await resp.prepare(request)
            await resp.write(path.read_bytes()[: ctl["stall_after"]])
            ctl["sent"].set()
            await ctl["release"].wait()
            return resp
        return web.FileResponse(path)

    app = web.Application()
    app.router.add_get("/api/models/{org}/{name}/revision/{rev}", info)
    app.router.add_get("/api/models/{org}/{name}", info)
    app.router.add_get("/{org}/{name}/resolve/{rev}/{file}", resolve)
    server = TestServer(app, port=0)
    await server.start_server()
    yield server, ctl
    ctl["release"].set()
    await server.close()


async def test_stage_from_fake_hub_verifies_hub_hashes(
    neuron_app_factory: InProcessFactory,
    fake_hub: tuple[TestServer, dict[str, Any]],
    demo_model: Path,
) -> None:
    """With no peers, the hub's metadata lists the files; sha256 and git blob ids verify."""
    hub, _ = fake_hub
    node = await neuron_app_factory(min_free_gb=0, hub_endpoint=str(hub.make_url("")))
    status, body = await _post(node, "/store/stage", {"model_id": "m", "source": REPO})
    assert status == 202, body
    job = await _job(node)
    await asyncio.wait_for(job.finished.wait(), 60)
    assert job.state == "staged", job.error
    assert job.manifest_from == "hub"
    assert job.path is not None and _tree_digest(job.path) == _hub_digest(demo_model)


def _unread_bytes(port: int) -> int | None:
    """Bytes on loopback TCP connections to or from `port` that the receiving process
    has not read yet: unacknowledged by its kernel, or waiting in its receive queue.
    None while there is no such connection."""
    total, seen = 0, False
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        ends = {int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)}
        if f[3] != "01" or port not in ends:  # ESTABLISHED only: a listener counts conns
            continue
        tx, rx = (int(x, 16) for x in f[4].split(":"))
        total, seen = total + tx + rx, True
    return total if seen else None


async def test_stalled_hub_does_not_stall_health_and_resumes_after_cancel(
    neuron_app_factory: InProcessFactory,
    fake_hub: tuple[TestServer, dict[str, Any]],
    demo_model: Path,
) -> None:
    """A hub that falls silent mid-file: /health answers; cancel keeps the part; resume ranges."""
    hub, ctl = fake_hub
    ctl["stall_after"] = 1000
    # A read of the hub never times out here: were the stage to block the event loop
    # (which this test shares with the neuron), the test itself would stop, and
    # pytest's timeout would say where.
    node = await neuron_app_factory(
        min_free_gb=0, hub_endpoint=str(hub.make_url("")), stage_read_timeout_s=3600.0
    )
    await _post(node, "/store/stage", {"model_id": "m", "source": REPO})
    job = await _job(node)
    # The hub sent its 1000 bytes, every other file is fetched, and the stage has read
    # all the bytes off the sockets (states, not times: the stage then holds the 1000
    # bytes, the one file still under way, and a cancel must keep them).
    await asyncio.wait_for(ctl["sent"].wait(), 60)

    def others_done() -> bool:
        return job.files_total is not None and job.files_done == job.files_total - 1

    await until(
        lambda: others_done() and _unread_bytes(hub.port or 0) == 0,
        timeout=90,
        what="every other file fetched and all the hub sent read",
        seen=lambda: (
            f"{job.files_done} of {job.files_total} files fetched, "
            f"{_unread_bytes(hub.port or 0)} bytes unread"
        ),
    )
    for _ in range(5):
        await asyncio.sleep(0)  # the read's data reaches the stage's buffer
        status, _ = await _get(node, "/health")
        assert status == 200
    assert job.state == "fetching"
    status, out = await _post(node, "/store/cancel", {"model_id": "m"})
    assert status == 200 and out["cancelled"] is True
    assert out["job"]["state"] == "failed" and out["job"]["error"] == "cancelled"
    part = _store(node) / "models" / ".staging" / NAME
    assert (part / "model.safetensors.part").stat().st_size == 1000
    ctl["stall_after"] = None
    ctl["requests"].clear()
    await _post(node, "/store/stage", {"model_id": "m", "source": REPO})
    job = await _job(node)
    await asyncio.wait_for(job.finished.wait(), 60)
    assert job.state == "staged", job.error
    assert ("model.safetensors", "bytes=1000-") in ctl["requests"]
    assert job.path is not None and _tree_digest(job.path) == _hub_digest(demo_model)
