"""Issue 22's pure parts: the `timing` object, the admission figures on the wire, the
jaccl errno advice and the exclusion message. No network, no process."""

from __future__ import annotations

import asyncio

import pytest

from cortex.core.life import admin_candidate
from cortex.core.state import NodeModel
from neuron.http.timing import MIN_RATE_SPAN_S, rate, timed_body, timed_event, timing, wants_timing
from neuron.runner.admission import Admission
from neuron.runner.rdma_quirk import classify, quirk_errno
from shared.catalogue import Catalogue, ModelFacts, ModelSpec
from shared.errors import PlacementRefused
from shared.wire import ModelHealth, ModelStatus
from tests.cortex.test_router import node, snap

# --- timing ---------------------------------------------------------------------


def test_timing_is_opt_in_by_header() -> None:
    assert wants_timing({"X-Cortex-Timing": "1"}) and wants_timing({"X-Cortex-Timing": "True"})
    assert not wants_timing({}) and not wants_timing({"X-Cortex-Timing": "0"})


def test_rates_only_over_a_real_interval() -> None:
    """Tokens that arrived in one read share a time: no 27,925 tok/s, a null instead."""
    assert rate(10, 0.5) == 20.0
    assert rate(10, MIN_RATE_SPAN_S / 10) is None
    assert rate(10, None) is None and rate(0, 1.0) is None and rate(True, 1.0) is None
    t = timing(
        {"prompt_tokens": 100, "completion_tokens": 21},
        queue_s=0.25,
        sent_at=10.0,
        first_at=10.5,
        last_at=12.5,
    )
    assert t == {"queue_s": 0.25, "ttft_s": 0.5, "prompt_tps": 200.0, "generation_tps": 10.0}
    burst = timing({"completion_tokens": 5}, queue_s=None, sent_at=1.0, first_at=1.2, last_at=1.2)
    assert burst["generation_tps"] is None and burst["ttft_s"] == pytest.approx(0.2)
    # 60 of 64 tokens read at once with the first: the rate is over the 4 after it.
    late = timing(
        {"completion_tokens": 64}, queue_s=0, sent_at=0, first_at=1.0, last_at=1.02, first_read=60
    )
    assert late["generation_tps"] == 200.0
    unseen = timing(None, queue_s=0.0, sent_at=None, first_at=None, last_at=None)
    assert unseen == {"queue_s": 0.0, "ttft_s": None, "prompt_tps": None, "generation_tps": None}


def test_timing_rides_after_usage_in_a_frame_and_a_body() -> None:
    t = {"ttft_s": 0.1}
    frame = timed_event({"model": "m", "choices": [], "usage": {"total_tokens": 3}}, t)
    assert frame.startswith(b'data: {"model": "m"')
    assert frame.endswith(b'"timing": {"ttft_s": 0.1}}\n\n')
    body = timed_body(b'{"id": "x", "usage": {}}', t)
    assert body == b'{"id": "x", "usage": {}, "timing": {"ttft_s": 0.1}}'
    assert timed_body(b"not json", t) == b"not json"


# --- admission figures ----------------------------------------------------------


async def test_admission_keeps_the_median_queue_wait() -> None:
    a = Admission(max_in_flight=1, max_queue=4, queue_timeout_s=30.0)
    assert a.wait_p50_s is None
    gate = asyncio.Event()

    async def hold() -> None:
        async with a.slot():
            await gate.wait()

    first = asyncio.create_task(hold())
    await asyncio.sleep(0)
    second = asyncio.create_task(hold())  # waits for the first's slot
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.gather(first, second)
    # Two waits: ~0 and >= 0.05 s; the median of two is their mean.
    assert a.wait_p50_s is not None and a.wait_p50_s >= 0.02
    print(f"median queue wait of [~0, ~0.05 s]: {a.wait_p50_s:.4f} s")


def test_admission_fields_parse_from_old_and_new_peers() -> None:
    old = {"model_id": "m", "state": "ready", "in_flight": 0, "queue_depth": 0}
    h = ModelHealth.from_json(old)
    assert (h.max_in_flight, h.queue_max, h.queue_wait_p50_s) == (None, None, None)
    new = {**h.to_json(), "max_in_flight": 8, "queue_max": 32, "queue_wait_p50_s": 0.5}
    assert ModelHealth.from_json(new).to_json() == new
    s = ModelStatus.from_json({"model_id": "m", "state": "ready", "group": None})
    assert s.queue_max is None
    full = {**s.to_json(), "max_in_flight": 2, "queue_max": 3, "queue_wait_p50_s": None}
    s2 = ModelStatus.from_json(full)
    assert s2.to_json() == full
    m = NodeModel.merge(s2, ModelHealth.from_json(new)).to_json()
    assert (m["max_in_flight"], m["queue_max"], m["queue_wait_p50_s"]) == (8, 32, 0.5)
    assert NodeModel.merge(s2, None).to_json()["queue_max"] == 3


# --- jaccl errno advice ---------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "errno", "says"),
    [
        ("[jaccl] Changing queue pair to RTS failed with errno 60", 60, "ibv_devinfo"),
        ("RuntimeError: [Errno 60] Operation timed out", 60, "PORT_DOWN"),
        ("[jaccl] recv: ETIMEDOUT", 60, "ETIMEDOUT"),
        ("[jaccl] send failed with errno 57", 57, "stale jaccl rank"),
        ("OSError: [Errno 57] Socket is not connected", 57, "ENOTCONN"),
        ("[jaccl] ibv_create_qp failed: errno 16", 16, "reboot this node"),
    ],
)
def test_each_jaccl_errno_gets_its_own_advice(line: str, errno: int, says: str) -> None:
    assert quirk_errno(line) == errno
    advice = classify("jaccl", 1, line)
    assert advice is not None and f"errno {errno}" in advice and says in advice, advice
    if errno in (57, 60):
        assert "reboot" not in advice  # neither needs one: a port, or a stale process
    assert classify("ring", 1, line) is None  # Linux numbers mean other things


# --- the exclusion message -----------------------------------------------------

SPEC = ModelSpec(id="m1", source="org/m1", memory_gb=1.0)
FACTS = ModelFacts(weights_bytes=2**30, kv_bytes=0, layers=8, heads=4, kv_heads=2)


def _refusal(spec: ModelSpec, *names: str, exclude: tuple[str, ...]) -> str:
    fleet = snap(*(node(n) for n in names))
    with pytest.raises(PlacementRefused) as err:
        admin_candidate(
            spec,
            FACTS,
            fleet,
            Catalogue(models=(spec,)),
            nodes=None,
            exclude=exclude,
            force=False,
        )
    return err.value.message


def test_exclusions_that_leave_no_candidate_say_so() -> None:
    msg = _refusal(SPEC, "a", "b", exclude=("a", "b"))
    assert "your exclusions removed every candidate (excluded: a, b: every node known)" in msg
    assert "no nodes known" not in msg
    pinned = ModelSpec(id="p", source="org/p", memory_gb=1.0, pinned_on=("a",))
    msg = _refusal(pinned, "a", "b", exclude=("a",))
    assert "your exclusions removed every candidate (excluded: a: every pinned_on node)" in msg
    # An empty fleet is still what it says.
    assert "no nodes known" in _refusal(SPEC, exclude=())
