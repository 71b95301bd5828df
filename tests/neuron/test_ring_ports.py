"""A group load whose ring port is taken is refused at once (neuron.runner.ports)."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from neuron.runner.ports import bind_once, ring_address
from shared.wire import GroupSpec
from tests.conftest import InProcessFactory, free_port, runner_pids
from tests.support.waiting import until


def _group(rank: int, hosts: list[str], backend: str = "ring") -> dict[str, Any]:
    return {
        "group_id": f"g-{uuid.uuid4().hex[:8]}",
        "rank": rank,
        "world_size": len(hosts),
        "backend": backend,
        "sharding": "tensor",
        "hosts": hosts,
    }


@pytest.fixture
def held() -> Iterator[int]:
    """A port held by a listening socket, as another process would hold it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_ring_address_is_this_ranks_own_entry() -> None:
    """Rank i checks hosts[i]; jaccl, a single rank or a malformed entry check nothing."""
    spec = GroupSpec.from_json(_group(1, ["10.0.0.1:28000", "10.0.0.2:28001"]))
    assert ring_address(spec) == ("10.0.0.2", 28001)
    assert ring_address(None) is None
    assert ring_address(GroupSpec.from_json(_group(0, ["h:1"]))) is None
    jaccl = GroupSpec("g", 0, 2, "jaccl", "tensor", coordinator="h:1")
    assert ring_address(jaccl) is None
    assert ring_address(GroupSpec("g", 0, 2, "ring", "tensor", hosts=("h:x", "h:2"))) is None


def test_bind_once_refuses_a_held_port_only(held: int) -> None:
    """A listener holds its port; a port whose last connection is in TIME_WAIT (an
    earlier group's rank, closed first) is free, as MLX's SO_REUSEADDR finds it."""
    with pytest.raises(OSError) as info:
        bind_once("127.0.0.1", held)
    print(f"held port {held}: {info.value}")
    with socket.socket() as listener:
        # As a rank listens (SO_REUSEADDR, which its accepted socket inherits).
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
    accepted.close()  # the rank's side closes first: its port goes to TIME_WAIT
    client.close()
    bind_once("127.0.0.1", port)
    bind_once("127.0.0.1", port)  # our own check leaves nothing behind


async def test_load_on_a_taken_ring_port_is_refused_before_any_runner(
    neuron_app_factory: InProcessFactory, demo_model: Path, held: int
) -> None:
    """409 ring_port_taken naming the port, in well under a second, and no model record
    or runner left; the same load on free ports is accepted."""
    server = await neuron_app_factory()
    url = str(server.make_url(""))
    model_id = f"rp-{uuid.uuid4().hex[:8]}"
    body = {
        "model_id": model_id,
        "source": str(demo_model),
        "group": _group(1, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{held}"]),
    }
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        async with s.post(url + "/models/load", json=body) as r:
            status, answer = r.status, await r.json()
        took = time.monotonic() - t0
        print(f"refused in {took * 1000:.0f} ms: {answer}")
        err = answer["error"]
        assert (status, err["code"]) == (409, "ring_port_taken"), answer
        assert str(held) in err["message"] and err["details"]["port"] == held
        async with s.get(url + "/models") as r:
            assert [m["model_id"] for m in (await r.json())["models"]] == []
        assert runner_pids(model_id) == []


async def test_a_load_under_way_is_joined_though_its_rank_holds_the_port(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """The same load posted again once its rank listens on the port: joined (202), not
    refused, though the port is held (by that rank)."""
    server = await neuron_app_factory()
    url = str(server.make_url(""))
    model_id = f"rp-{uuid.uuid4().hex[:8]}"
    port = free_port()
    # Rank 0 of 2 listens on its port and waits there for rank 1, which never comes.
    body = {
        "model_id": model_id,
        "source": str(demo_model),
        "group": _group(0, [f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"]),
    }

    def listening() -> bool:
        try:
            bind_once("127.0.0.1", port)
        except OSError:
            return True
        return False

    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/models/load", json=body) as r:
            assert r.status == 202, await r.text()
        t0 = time.monotonic()
        await until(listening, timeout=120, interval=0.1, what=f"rank 0 listening on {port}")
        print(f"rank 0 listening {time.monotonic() - t0:.1f} s after its load")
        async with s.post(url + "/models/load", json=body) as r:
            assert r.status == 202, await r.text()
        async with s.post(url + "/models/unload", json={"model_id": model_id}) as r:
            assert r.status == 200, await r.text()
    assert runner_pids(model_id) == []
