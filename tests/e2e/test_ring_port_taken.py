"""A ring port block held by another process costs a group load nothing (issue 19).

Two real neurons on loopback, a real cortex, the demo model as a 2-rank ring
group loaded on the first request. Ports of the first two blocks are held by
sockets this test binds: the member whose rank needs one refuses the load at
once (409 `ring_port_taken`), cortex undoes the other rank, skips the block and
tries the next one, with no failed load and no backoff.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import NeuronProcess, runner_pids, wait_until
from tests.e2e.conftest import CortexProcess
from tests.support.clients import post_chat
from tests.support.local import free_port_run


@pytest.fixture
def held() -> Iterator[tuple[int, list[int]]]:
    """A fresh base port, and two ports held by listening sockets: rank 1's of the
    first block (base + 1) and rank 0's of the second (base + 2)."""
    base = free_port_run(6)
    ports = [base + 1, base + 2]
    socks = []
    try:
        for p in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", p))
            s.listen()
        yield base, ports
    finally:
        for s in socks:
            s.close()


def _failed_loads(c: CortexProcess) -> float:
    """cortex_cold_loads_total{result="failed"}, summed over models."""
    with urllib.request.urlopen(c.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r'^cortex_cold_loads_total\{[^}]*result="failed"[^}]*\} (\S+)$', text, re.M)
    return sum(float(v) for v in found)


def _ring_ports(c: CortexProcess, model_id: str) -> list[int]:
    """The ring ports of the model's group, as its members report them."""
    state = c.get("/admin/state")[1]
    for n in state["nodes"]:
        for m in n["models"]:
            if m["model_id"] == model_id and m["group"] is not None:
                return sorted(int(h.rsplit(":", 1)[1]) for h in m["group"]["hosts"])
    return []


def test_taken_ring_port_block_is_skipped_on_the_first_request(
    neuron_factory: Any,
    cortex_factory: Any,
    demo_model: Any,
    model_id: str,
    held: tuple[int, list[int]],
) -> None:
    """Rank 1's port of the first block and rank 0's of the second are held: the first
    request is answered from the third block, with no failed load; each skip is in the
    event log, and the ranks the skipped blocks started are gone."""
    base, ports = held
    neurons: list[tuple[str, NeuronProcess]] = [
        (name, neuron_factory(name=name)) for name in ("a", "b")
    ]
    spec = {
        "id": model_id,
        "source": str(demo_model),
        "min_nodes": 2,
        "sharding": "tensor",
        "backend": "ring",
    }
    c = cortex_factory(neurons, [spec], ring_base_port=base)
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 2, 30, "both nodes healthy")

    statuses: list[int] = []
    last: Any = None
    t0 = time.monotonic()

    def answered() -> bool:
        nonlocal last
        status, last = post_chat(c.url, model_id, max_tokens=8, temperature=0, timeout=180)
        statuses.append(status)
        if status == 503:
            time.sleep(0.5)  # loading, or (before the fix) a failed load backing off
        return status == 200

    wait_until(answered, 180, f"{model_id} to answer (last: {last!r})")
    took = time.monotonic() - t0
    print(
        f"\nring ports {ports} held: first answer {took:.1f} s after the first request;"
        f" answers before it: {statuses[:-1] or 'none'}; failed loads: {_failed_loads(c):g}"
    )
    assert statuses == [200], f"the first request was not answered at once: {statuses}"
    assert _failed_loads(c) == 0
    assert _ring_ports(c, model_id) == [base + 4, base + 5]
    life = next(m for m in c.get("/admin/state")[1]["models"] if m["id"] == model_id)
    assert life["life"]["failure"] is None, life
    events = c.get(f"/admin/events?model={model_id}")[1]["events"]
    skipped = [e for e in events if e["kind"] == "ring port taken"]
    for e in skipped:
        print(f"event: {e['node']}: {e['detail']}")
    started = next(e["ts"] for e in events if e["kind"] == "load started")
    print(f"load started -> last block skipped: {skipped[-1]['ts'] - started:.3f} s")
    # One skip per held port, in order (zip's strict: exactly as many).
    assert all(f"ring port {p} " in e["detail"] for p, e in zip(ports, skipped, strict=True))
    # The ranks the skipped blocks started were unloaded: one runner per member is left.
    assert len(runner_pids(model_id)) == 2, runner_pids(model_id)
