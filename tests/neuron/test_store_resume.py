"""The store finishes what it started: a stage cut by a kill or a full disk, resumed.

Real neurons (`neuron serve` subprocesses): a peer holding a copy, and a target
staging it. Between them a TCP relay (a real socket hop on loopback) forwards
the peer's bytes and can hold them after a threshold, so the target is caught
mid-file by state, never by timing: the test waits until the relay holds and the
`.part` on the target's disk has grown, then kills the target (or fills its disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from neuron.http.app import STAGER
from neuron.store.staging import WRITE_CHUNK
from neuron.store.wishes import WISHES_FILE, StageWishes
from tests.conftest import InProcessFactory, NeuronProcess, free_port, stop_quietly
from tests.support.waiting import until

REPO = "test-org/resume-demo"
NAME = "test-org--resume-demo"
BIG = 32 * 1024 * 1024
# The relay holds after this many bytes: more than two write chunks, so at least
# two have landed in the target's `.part` while it is held.
HOLD_AT = 3 * WRITE_CHUNK
LANDED = 2 * WRITE_CHUNK
SETTINGS = {"min_free_gb": 0}


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The demo model plus 32 MB of random bytes, listed first (a file worth resuming)."""
    d = tmp_path_factory.mktemp("resume-model") / "m"
    shutil.copytree(demo_model, d)
    (d / "big.safetensors").write_bytes(os.urandom(BIG))
    return d


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, big_model: Path) -> Iterator[NeuronProcess]:
    """A neuron serving a staged copy of REPO to its peers."""
    d = tmp_path_factory.mktemp("resume-peer")
    shutil.copytree(big_model, d / "store" / "models" / NAME, copy_function=os.link)
    n = NeuronProcess.start(d, SETTINGS)
    yield n
    stop_quietly(n)


@attrs.define
class Relay:
    """A TCP relay to `port` that counts what it forwards back and can hold it.

    Past `hold_after` bytes it stops forwarding until `release()`. A `cut()`
    starts a new generation: connections of the old one (a killed client's) end
    without forwarding another byte, and `sent` counts the new one only.
    """

    port: int
    hold_after: int | None = None
    sent: int = 0
    generation: int = 0
    _released: asyncio.Event = attrs.Factory(asyncio.Event)
    _server: asyncio.Server | None = None
    _conns: set[asyncio.Task[None]] = attrs.Factory(set)
    _writers: set[asyncio.StreamWriter] = attrs.Factory(set)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    @property
    def holding(self) -> bool:
        return self.hold_after is not None and self.sent >= self.hold_after

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        """Every connection ended and awaited, so none is left for the loop's teardown."""
        self.cut()
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        if self._conns:
            await asyncio.wait(self._conns, timeout=30)

    def release(self) -> None:
        """Forward again, on the same connections."""
        self.hold_after = None
        self._released.set()
        self._released = asyncio.Event()

    def cut(self) -> None:
        """Drop every connection so far and count afresh."""
        self.generation += 1
        self.sent = 0
        self.release()

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)
        gen = self.generation
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            down_w.close()
            return
        self._writers |= {down_w, up_w}
        await asyncio.gather(
            self._pump(down_r, up_w, gen, count=False),
            self._pump(up_r, down_w, gen, count=True),
            return_exceptions=True,
        )
        self._writers -= {down_w, up_w}

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, gen: int, *, count: bool
    ) -> None:
        try:
            while data := await src.read(256 * 1024):
                while count and self.holding and gen == self.generation:
                    await self._released.wait()
                if gen != self.generation:
                    return
                if count:
                    self.sent += len(data)
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


@pytest_asyncio.fixture
async def relay(peer: NeuronProcess) -> AsyncIterator[Relay]:
    r = Relay(port=peer.port)
    await r.start()
    yield r
    await r.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".neuron-")
    }


def _wished(store: Path) -> list[str]:
    try:
        body = json.loads((store / WISHES_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [s["source"] for s in body["stages"]]


async def _start(neuron_factory: Any, **settings: Any) -> NeuronProcess:
    n: NeuronProcess = await asyncio.to_thread(neuron_factory, {**SETTINGS, **settings}, "target")
    return n


async def _stage_until_held(target: NeuronProcess, relay: Relay, store: Path) -> Path:
    """Start the stage through the relay; return its big `.part` once held mid-file."""
    relay.hold_after = HOLD_AT
    body = {"model_id": "m", "source": REPO, "peers": [relay.url]}
    status, job = await asyncio.to_thread(target.post, "/store/stage", body)
    assert status == 202, job
    part = store / "models" / ".staging" / NAME / "big.safetensors.part"
    await until(
        lambda: relay.holding and _size(part) >= LANDED,
        timeout=60,
        what="the relay holding with two write chunks in the .part",
        seen=lambda: f"relayed {relay.sent} bytes, .part {_size(part)} bytes",
    )
    return part


async def _copied(copy: Path) -> None:
    await until(
        lambda: (copy / "config.json").is_file(),
        timeout=60,
        interval=0.05,
        what=f"the copy at {copy}",
    )


async def test_neuron_killed_mid_peer_copy_resumes_it_at_restart(
    neuron_factory: Any, relay: Relay, big_model: Path
) -> None:
    """SIGKILL mid-file; the restarted neuron resumes the copy by itself, from the .part."""
    target = await _start(neuron_factory)
    store = target.dir / "store"
    part = await _stage_until_held(target, relay, store)
    at_kill = _size(part)
    target.process.kill()
    target.process.wait()
    relay.cut()
    assert _wished(store) == [REPO]
    t0 = time.monotonic()
    target = await _start(neuron_factory)  # the same store, nobody asks it anything
    up = time.monotonic() - t0
    await _copied(store / "models" / NAME)
    took = time.monotonic() - t0
    print(
        f"\nresumed stage after a SIGKILL: restart to complete copy {took:.2f} s "
        f"(neuron up in {up:.2f} s); {at_kill} bytes kept in the .part, "
        f"{relay.sent} bytes relayed after the restart for a {BIG}-byte file"
    )
    assert relay.sent < BIG  # resumed with a Range, not fetched again
    assert _digest(store / "models" / NAME) == _digest(big_model)
    assert f"resuming the stage of {REPO} for m" in target.log()
    await until(lambda: _wished(store) == [], timeout=30, what="the wish dropped once staged")


@contextlib.contextmanager
def _small_tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` at `path` (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs store needs root (mount -t tmpfs); this run is not root")
    path.mkdir(parents=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def _fill(path: Path) -> int:
    """Write `path` until the disk is full; the bytes written."""
    written = 0
    block = b"\0" * (256 * 1024)
    with path.open("wb", buffering=0) as f:
        while True:
            try:
                n = f.write(block)
            except OSError:
                return written
            written += n or 0
            if not n:
                return written


async def _job(target: NeuronProcess) -> dict[str, Any] | None:
    _, body = await asyncio.to_thread(target.get, "/store/storage")
    return next((j for j in body["staging"] if j["name"] == NAME), None)


async def test_disk_full_mid_stage_is_insufficient_storage_and_resumes(
    neuron_factory: Any, relay: Relay, big_model: Path, tmp_path: Path
) -> None:
    """ENOSPC mid-file: insufficient_storage with the numbers, the .part kept, no traceback."""
    with _small_tmpfs(tmp_path / "small", 48) as small:
        store = small / "store"
        target = await _start(neuron_factory, store_dir=str(store))
        try:
            await _check_disk_full(target, relay, small, big_model)
        finally:
            await asyncio.to_thread(stop_quietly, target)  # before the unmount


async def _check_disk_full(
    target: NeuronProcess, relay: Relay, small: Path, big_model: Path
) -> None:
    store = small / "store"
    part = await _stage_until_held(target, relay, store)
    filler = small / "filler"
    await asyncio.to_thread(_fill, filler)
    relay.release()
    job = await until(
        lambda: _failed(target), timeout=60, what="the stage to fail on the full disk"
    )
    d = job["error_details"]
    print(f"\ndisk full mid-stage: {job['error']}")
    assert job["error_code"] == "insufficient_storage", job
    assert d["free_bytes"] < d["need_bytes"] and d["store"] == str(store / "models")
    assert d["need_bytes"] + d["done_bytes"] == d["total_bytes"]
    assert str(d["need_bytes"]) in job["error"] and str(d["free_bytes"]) in job["error"]
    kept = _size(part)
    assert kept >= LANDED  # the partial file stays for a resume
    log = target.log()
    assert "Traceback" not in log and "OSError" not in log
    warnings = [ln for ln in log.splitlines() if " WARNING " in ln and NAME in ln]
    assert len(warnings) == 1 and "ran out of disk" in warnings[0], warnings
    assert _wished(store) == [REPO]  # still wished: a restart after a cleanup resumes
    # Space freed: staging again resumes from the kept bytes.
    filler.unlink()
    relay.cut()
    body = {"model_id": "m", "source": REPO, "peers": [relay.url]}
    status, _ = await asyncio.to_thread(target.post, "/store/stage", body)
    assert status == 202
    await _copied(store / "models" / NAME)
    assert relay.sent <= BIG - kept + 1024 * 1024  # the kept bytes were not fetched again
    assert _digest(store / "models" / NAME) == _digest(big_model)


async def _failed(target: NeuronProcess) -> dict[str, Any] | None:
    job = await _job(target)
    return job if job is not None and job["state"] == "failed" else None


async def test_a_stop_keeps_the_wish_and_a_cancel_drops_it(
    neuron_app_factory: InProcessFactory, relay: Relay, tmp_path: Path
) -> None:
    """A neuron stopped mid-stage resumes it at its next start; a cancelled stage is unwished."""
    store = tmp_path / "kept-store"
    first = await neuron_app_factory(store_dir=str(store), min_free_gb=0)
    relay.hold_after = HOLD_AT
    body = {"model_id": "m", "source": REPO, "peers": [relay.url]}
    part = store / "models" / ".staging" / NAME / "big.safetensors.part"
    status, _ = await _post(first, "/store/stage", body)
    assert status == 202
    await until(lambda: relay.holding and _size(part) >= LANDED, timeout=60, what="held")
    await first.close()  # a graceful stop (SIGTERM's path): the stage is cancelled by it
    assert _wished(store) == [REPO]
    at_stop = _size(part)
    relay.cut()
    relay.hold_after = HOLD_AT
    second = await neuron_app_factory(store_dir=str(store), min_free_gb=0)
    job = second.app[STAGER].jobs[NAME]  # resumed at startup, nobody asked
    await until(
        lambda: relay.holding and _size(part) >= at_stop + LANDED,
        timeout=60,
        what="the resumed stage held again, two more write chunks in",
        seen=lambda: f"{job.state} {job.error} {job.bytes_done} bytes, .part {_size(part)}",
    )
    assert job.active, job.error
    assert job.bytes_done >= at_stop  # counted from the kept bytes, not from zero
    status, out = await _post(second, "/store/cancel", {"model_id": "m"})
    assert status == 200 and out["cancelled"] is True
    await until(lambda: _wished(store) == [], timeout=30, what="the wish dropped by the cancel")
    assert _size(part) >= at_stop + LANDED  # the bytes stay for a later stage


async def _post(server: TestServer, path: str, body: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(str(server.make_url(path)), json=body) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_the_stage_cli_follows_a_stage_across_a_restart(
    neuron_factory: Any, relay: Relay
) -> None:
    """`neuron stage` keeps following while its neuron is killed and started again."""
    port = free_port()
    target = await _start(neuron_factory, port=port)
    store = target.dir / "store"
    part = store / "models" / ".staging" / NAME / "big.safetensors.part"
    relay.hold_after = HOLD_AT
    argv = ["-m", "neuron.cli", "stage", "m", REPO, "--url", target.url, "--peer", relay.url]
    cli = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    await until(lambda: relay.holding and _size(part) >= LANDED, timeout=60, what="held")
    target.process.kill()
    target.process.wait()
    relay.cut()
    await _start(neuron_factory, port=port)  # the same URL, the same store
    out, err = await asyncio.wait_for(cli.communicate(), 90)
    assert cli.returncode == 0, (out, err)
    assert out.decode().splitlines()[-1].startswith("m: staged "), out


def test_a_bad_wish_starts_no_stage(tmp_path: Path) -> None:
    """Entries that are not a hub repo with URL peers are skipped; an unreadable file is none."""
    path = tmp_path / WISHES_FILE
    good = {"model_id": "m", "source": REPO, "peers": ["http://10.0.0.2:9410"]}
    bad = [
        {"model_id": "m", "source": "/etc", "peers": []},
        {"model_id": "m", "source": "../x", "peers": []},
        {"model_id": "", "source": REPO, "peers": []},
        {"model_id": "m", "source": "a/b", "peers": ["file:///etc/passwd"]},
        "not an object",
    ]
    path.write_text(json.dumps({"version": 1, "stages": [*bad, good]}))
    assert [w.to_json()["source"] for w in StageWishes(path).load()] == [REPO]
    path.write_text("{not json")
    assert StageWishes(path).load() == []
