"""`cortex linktest`: a real mx.distributed ring all-reduce over two real neurons."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cortex.cli.linktest import parse_sizes
from cortex.http.linktest import LinkTestPlan, summarize
from tests.conftest import NeuronProcess, free_port, http_json, wait_until
from tests.e2e.conftest import CortexProcess

TOKEN = "linktest-admin-token"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "linktest", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "CORTEX_ADMIN_TOKEN": TOKEN},
    )


def _linktest_pids() -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if b"neuron.runner.linktest_main" in argv and state != "Z":
                out.append(int(entry.name))
    return out


def _base_port() -> int:
    """A ring port block of our own, below the groups' default (28000) and below the
    kernel's ephemeral range (32768 on): a port there may be any test's outgoing
    connection (the hops' kept-alive ones included), which made a block unbindable."""
    return 20000 + secrets.randbelow(7000)


def _fleet(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, base: int | None = None
) -> tuple[Any, Any, Any]:
    a: NeuronProcess = neuron_factory(name="a")
    b: NeuronProcess = neuron_factory(name="b")
    c: CortexProcess = cortex_factory(
        [("a", a), ("b", b)],
        [{"id": "demo", "source": str(demo_model)}],
        admin_token=TOKEN,
        ring_base_port=base if base is not None else _base_port(),
    )
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 2, 30, "both nodes healthy")
    return a, b, c


def test_linktest_over_a_two_rank_ring_reports_bandwidth_per_size_and_round(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path
) -> None:
    """Two neurons run a real ring all_sum on loopback; every round has a time and a
    bandwidth, every size its jitter; then one neuron down is a clear failure, no hang."""
    _, b, c = _fleet(neuron_factory, cortex_factory, demo_model)
    done = _cli("--url", c.url, "--nodes", "a,b", "--sizes", "1K,1M,16M", "--rounds", "3")
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "linktest ring over a, b (2 ranks" in done.stdout
    assert "busbw = algbw * 2(n-1)/n" in done.stdout
    for size in ("1 KiB", "1 MiB", "16 MiB"):
        assert f"\n  {size} " in done.stdout and f"{size} rounds:" in done.stdout
    assert done.stdout.rstrip().endswith("ok")

    js = _cli("--url", c.url, "--sizes", "64K", "--rounds", "2", "--json")
    assert js.returncode == 0, js.stdout + js.stderr
    report = json.loads(js.stdout)
    assert report["ok"] and report["nodes"] == ["a", "b"] and report["failures"] == []
    (size,) = report["sizes"]
    assert size["size_bytes"] == 65536 and size["ok"] == 2
    for r in size["rounds"]:
        assert r["ok"] and r["seconds"] > 0
        assert r["algbw_Bps"] == pytest.approx(65536 / r["seconds"])
        assert r["busbw_Bps"] == pytest.approx(r["algbw_Bps"])  # 2(n-1)/n = 1 for n = 2
    assert size["jitter_s"]["stdev"] >= 0
    assert [r["ok"] for r in report["ranks"]] == [True, True]
    assert _linktest_pids() == []

    # b goes down: cortex still has its discovery, the post to it cannot connect.
    b.stop()
    failed = _cli("--url", c.url, "--nodes", "a,b", "--sizes", "1K", "--timeout", "60")
    print(failed.stdout)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "failures:" in failed.stdout
    assert "b (rank 1): node b is unreachable" in failed.stdout
    # a's rank was told to stop, not left waiting for its peer until the deadline.
    assert "a (rank 0): rank 0 stopped before every rank joined: stopped by cortex: b failed" in (
        failed.stdout
    )
    assert "1 KiB rounds: FAILED #0, FAILED #1" in failed.stdout
    assert "size 1 KiB round 0" not in failed.stdout  # said once, per rank
    assert failed.stdout.rstrip().endswith("FAILED")
    wait_until(lambda: _linktest_pids() == [], 60, "no rank process left")


def test_linktest_needs_the_admin_token_and_two_nodes(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path
) -> None:
    """Without the token: 401 (exit 2); one node only: 400 naming why (exit 2)."""
    _, _, c = _fleet(neuron_factory, cortex_factory, demo_model)
    no_token = subprocess.run(
        [sys.executable, "-m", "cortex.cli", "linktest", "--url", c.url],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "CORTEX_ADMIN_TOKEN"},
    )
    assert no_token.returncode == 2 and "401" in no_token.stderr
    one = _cli("--url", c.url, "--nodes", "a")
    assert one.returncode == 2 and "needs 2 or more nodes" in one.stderr


def test_sizes_parse_with_binary_units() -> None:
    assert parse_sizes("1K,1M,16M,512,2KiB") == [1024, 1 << 20, 16 << 20, 512, 2048]


def test_summary_takes_the_slowest_rank_and_names_a_failed_round() -> None:
    """A round's time is its slowest rank's; a rank's failed round fails it for all."""
    plan = LinkTestPlan(
        nodes=("a", "b"), backend="ring", sizes=(1000,), rounds=2, warmup=0, timeout_s=5
    )

    def rank(secs: list[float], bad: int | None = None) -> dict[str, Any]:
        rounds = [
            {"size": 1000, "round": i, "seconds": s, "ok": i != bad, "error": "wrong sum"}
            for i, s in enumerate(secs)
        ]
        return {"ok": bad is None, "rounds": rounds, "error": None}

    report = summarize(plan, [rank([0.001, 0.002]), rank([0.004, 0.001], bad=1)])
    r0, r1 = report["sizes"][0]["rounds"]
    assert r0["ok"] and r0["seconds"] == 0.004 and r0["algbw_Bps"] == pytest.approx(250_000)
    assert not r1["ok"] and r1["error"] == "b: wrong sum"
    assert not report["ok"]
    assert report["failures"] == [{"size": 1000, "round": 1, "error": "b: wrong sum"}]


def test_a_rank_whose_peer_never_joins_is_killed_at_its_deadline(
    neuron_factory: Any,
) -> None:
    """Alone in a two-rank ring, the rank waits for a peer that never comes: the neuron
    ends it at timeout_s, says so, and leaves no process behind; a bad request is a 400."""
    a: NeuronProcess = neuron_factory(name="a")
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    group = {
        "group_id": "lt",
        "rank": 0,
        "world_size": 2,
        "backend": "ring",
        "sharding": "tensor",
        "hosts": hosts,
    }
    body = {"test_id": "alone", "group": group, "sizes": [1024], "rounds": 2, "timeout_s": 3}
    # Answered once the rank is ended (3 s) and reaped: a generous wait for the answer.
    status, answer = http_json(a.url + "/linktest", body, timeout=120)
    assert status == 200, answer
    assert not answer["ok"] and answer["rounds"] == []
    assert answer["error"] == "rank 0 stopped before every rank joined: timed out after 3 s"
    assert answer["elapsed_s"] < 60  # bounded by the deadline, generously
    assert _linktest_pids() == []
    status, bad = a.post("/linktest", {**body, "sizes": [0]})
    assert status == 400 and bad["error"]["param"] == "sizes"


def test_a_port_block_that_cannot_be_bound_is_retried_on_the_next(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path
) -> None:
    """Rank 0's port is taken (as by a socket in TIME_WAIT): the test moves to the next
    block, says so, and passes."""
    with socket.socket() as busy:
        for _ in range(20):
            base = _base_port()
            try:
                busy.bind(("127.0.0.1", base))
                break
            except OSError:
                continue
        busy.listen()
        _, _, c = _fleet(neuron_factory, cortex_factory, demo_model, base=base)
        done = _cli("--url", c.url, "--sizes", "4K", "--rounds", "2")
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"retried: ports {base}..{base + 1} could not be bound" in done.stdout
    assert f"ports from {base + 2})" in done.stdout
