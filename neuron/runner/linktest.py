"""POST /linktest: run this node's rank of an `mx.distributed` all-reduce test.

Cortex posts one request to every member at once, each with its rank's
GroupSpec (the same record a runner group's load carries, so the rank joins
the group exactly as a runner's would: same environment, same hostfile). The
rank is `neuron.runner.linktest_main` in its own process group, holding a watchdog
pipe like a runner; it never outlives the request: a deadline, a
POST /linktest/stop from cortex (another member failed), a client that left
or the neuron stopping all kill its whole group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from neuron.runner.main import PARENT_ENV
from neuron.runner.process import group_env, spawn_guarded, write_group_files
from neuron.store.sources import Store
from shared.errors import InvalidRequest, read_json_object
from shared.wire import FieldError, GroupSpec

MAX_SIZE = 1 << 30
MAX_SIZES = 16
MAX_ROUNDS = 1000
MAX_TIMEOUT_S = 600.0
TEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TAIL_LINES = 20


@attrs.frozen
class LinkTestRequest:
    test_id: str
    group: GroupSpec
    sizes: tuple[int, ...]
    rounds: int = 5
    warmup: int = 1
    timeout_s: float = 60.0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LinkTestRequest:
        test_id = d.get("test_id")
        if not isinstance(test_id, str) or not TEST_ID.match(test_id):
            raise InvalidRequest("`test_id` must match [A-Za-z0-9_.-]{1,64}", param="test_id")
        try:
            group = GroupSpec.from_json(d.get("group"))
        except FieldError as exc:
            raise InvalidRequest(f"bad group: {exc}", param=exc.param) from exc
        if group.world_size < 2:
            raise InvalidRequest("a link test needs a group of 2 or more ranks", param="group")
        sizes = d.get("sizes")
        if (
            not isinstance(sizes, list)
            or not 1 <= len(sizes) <= MAX_SIZES
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes)
            or not all(4 <= s <= MAX_SIZE for s in sizes)
        ):
            raise InvalidRequest(
                f"`sizes` must be 1..{MAX_SIZES} byte counts in 4..{MAX_SIZE}", param="sizes"
            )
        rounds, warmup = d.get("rounds", 5), d.get("warmup", 1)
        for name, v, hi in (("rounds", rounds, MAX_ROUNDS), ("warmup", warmup, 100)):
            lo = 1 if name == "rounds" else 0
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise InvalidRequest(f"`{name}` must be an integer in {lo}..{hi}", param=name)
        timeout = d.get("timeout_s", 60.0)
        if (
            not isinstance(timeout, (int, float))
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_TIMEOUT_S
        ):
            raise InvalidRequest(
                f"`timeout_s` must be in (0, {MAX_TIMEOUT_S:g}]", param="timeout_s"
            )
        return cls(
            test_id=test_id,
            group=group,
            sizes=tuple(sizes),
            rounds=rounds,
            warmup=warmup,
            timeout_s=float(timeout),
        )


@attrs.define(eq=False)
class RankProcess:
    process: asyncio.subprocess.Process
    watchdog_w: int
    stopped: str | None = None

    def kill(self, why: str) -> None:
        if self.stopped is None:
            self.stopped = why
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


@attrs.define
class LinkTests:
    config: NeuronConfig
    store: Store
    running: dict[str, RankProcess] = attrs.Factory(dict)
    # Stops that arrived before their rank started (cortex stops the others at once).
    _early: collections.OrderedDict[str, str] = attrs.Factory(collections.OrderedDict)

    async def run(self, req: LinkTestRequest) -> dict[str, Any]:
        if req.test_id in self.running:
            raise InvalidRequest(f"link test {req.test_id!r} is already running here")
        files = self.store.logs_dir / f"linktest-{req.test_id}"
        await asyncio.to_thread(write_group_files, req.group, files)
        env = {
            **os.environ,
            **group_env(req.group, files),
            PARENT_ENV: str(os.getpid()),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [
            self.config.runner.python,
            "-m",
            "neuron.runner.linktest_main",
            "--backend",
            req.group.backend,
            "--sizes",
            ",".join(str(s) for s in req.sizes),
            "--rounds",
            str(req.rounds),
            "--warmup",
            str(req.warmup),
        ]
        process, write_fd = await spawn_guarded(argv, env, stderr=asyncio.subprocess.PIPE)
        rank = RankProcess(process=process, watchdog_w=write_fd)
        self.running[req.test_id] = rank
        early = self._early.pop(req.test_id, None)
        if early is not None:
            rank.kill(early)
        try:
            return await self._follow(req, rank)
        finally:
            rank.kill("finished")
            del self.running[req.test_id]
            os.close(write_fd)
            await process.wait()
            await asyncio.to_thread(shutil.rmtree, files, True)

    async def _follow(self, req: LinkTestRequest, rank: RankProcess) -> dict[str, Any]:
        proc = rank.process
        assert proc.stdout is not None and proc.stderr is not None
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        err_reader = asyncio.create_task(_read_tail(proc.stderr, tail))
        joined: dict[str, Any] | None = None
        rounds: list[dict[str, Any]] = []
        done = False
        error: str | None = None
        started = time.monotonic()
        try:
            async with asyncio.timeout(req.timeout_s):
                while line := await proc.stdout.readline():
                    try:
                        event = json.loads(line)
                    except ValueError:
                        tail.append(line.decode(errors="replace").rstrip())
                        continue
                    kind = event.pop("event", None)
                    if kind == "joined":
                        joined = event
                    elif kind == "round":
                        rounds.append(event)
                    elif kind == "done":
                        done = True
        except TimeoutError:
            rank.kill(f"timed out after {req.timeout_s:g} s")
        code = await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(err_reader, 2.0)
        if not done:
            expected = len(req.sizes) * req.rounds
            where = (
                "before every rank joined"
                if joined is None
                else f"after {len(rounds)} of {expected} round(s)"
            )
            why = rank.stopped or f"rank exited with code {code}"
            error = f"rank {req.group.rank} stopped {where}: {why}"
        return {
            "test_id": req.test_id,
            "rank": req.group.rank,
            "world_size": req.group.world_size,
            "backend": req.group.backend,
            "ok": done and all(r.get("ok") for r in rounds),
            "joined": joined,
            "rounds": rounds,
            "error": error,
            "exit_code": code,
            "elapsed_s": time.monotonic() - started,
            "stderr_tail": list(tail),
        }

    def stop(self, test_id: str, why: str) -> bool:
        rank = self.running.get(test_id)
        if rank is None:
            self._early[test_id] = why
            while len(self._early) > 64:
                self._early.popitem(last=False)
            return False
        rank.kill(why)
        return True

    def stop_all(self) -> None:
        for rank in self.running.values():
            rank.kill("neuron stopping")


async def _read_tail(stream: asyncio.StreamReader, tail: collections.deque[str]) -> None:
    while line := await stream.readline():
        tail.append(line.decode(errors="replace").rstrip())


LINKTESTS = web.AppKey("linktests", LinkTests)


async def post_linktest(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    req = LinkTestRequest.from_json(body)
    result = await request.app[LINKTESTS].run(req)
    return web.json_response(result)


async def post_linktest_stop(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    test_id = body.get("test_id")
    if not isinstance(test_id, str) or not test_id:
        raise InvalidRequest("missing `test_id`", param="test_id")
    reason = body.get("reason")
    why = f"stopped by cortex: {reason}" if isinstance(reason, str) else "stopped by cortex"
    stopped = request.app[LINKTESTS].stop(test_id, why[:500])
    return web.json_response({"test_id": test_id, "stopped": stopped})


def setup(app: web.Application, config: NeuronConfig, store: Store) -> None:
    """Routes and state of the link test, and no rank left when the neuron stops."""
    tests = LinkTests(config=config, store=store)
    app[LINKTESTS] = tests

    async def cleanup(app: web.Application) -> AsyncIterator[None]:
        yield
        tests.stop_all()

    app.cleanup_ctx.append(cleanup)
    app.router.add_post("/linktest", post_linktest)
    app.router.add_post("/linktest/stop", post_linktest_stop)
