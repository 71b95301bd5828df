"""cortex.core.tracing: what the relay learns from the bytes it passes on."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from cortex.core.tracing import TraceDraft
from cortex.http.traces import TRACES
from neuron.tracing import usage_comment
from shared.journal import MB
from tests.cortex.fakes import fleet, gateway, stop_all
from tests.support.clients import CHAT, chat

STREAM = (
    b'data: {"choices":[{"delta":{"content":"a: usage {\\"x\\":1}"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
    + usage_comment({"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13})
    + b"data: [DONE]\n\n"
)


def test_usage_comment_is_read_wherever_the_reads_cut_it() -> None:
    """The neuron's `: usage` comment is found even split across two reads, and a
    content string that looks like one is not taken for it."""
    for cut in range(1, len(STREAM)):
        t = TraceDraft("r")
        t.first_at = 1.0
        t.scan(STREAM[:cut])
        t.scan(STREAM[cut:])
        assert (t.prompt_tokens, t.completion_tokens) == (11, 2), cut
        done = t.done("200")
        assert done.tokens_from == "usage" and done.completion_tokens == 2


def test_without_usage_cortex_counts_content_events() -> None:
    t = TraceDraft("r")
    t.scan(STREAM.split(b"\n: usage")[0])
    assert t.done("200").completion_tokens == 2
    assert t.done("200").tokens_from == "frames"


def test_a_usage_frame_gives_the_counts_and_is_no_token() -> None:
    frame = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    t = TraceDraft("r")
    t.scan(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    t.scan(b"data: " + json.dumps(frame).encode() + b"\n\ndata: [DONE]\n\n")
    assert (t.prompt_tokens, t.completion_tokens, t.frames) == (3, 1, 1)


async def test_a_retried_request_names_every_node_tried_and_asks_each() -> None:
    """A node that fails before its first byte, then another that answers: the trace
    lists both in order, the answer's node, and the joined view has a part per node
    (these fakes keep no traces: each says why)."""
    a, b = await fleet("a", "b")
    try:
        for n in (a, b):
            n.add_model("m1")
        a.chat_error = (503, "shutting_down")
        async with gateway([a, b]) as client:
            for i in range(4):
                # A prompt each: prefix affinity must not pin them all to one node.
                body = chat(stream=i % 2 == 0, text=f"prompt number {i} " * 8)
                r = await client.post(CHAT, json=body, headers={"X-Request-Id": f"t{i}"})
                assert r.status == 200 and r.headers["X-Request-Id"] == f"t{i}"
                await r.read()
            listed = (await (await client.get("/admin/traces")).json())["traces"]
            assert [t["id"] for t in listed] == ["t3", "t2", "t1", "t0"]  # newest first
            assert all(t["status"] == "200" and t["node"] == "b" for t in listed)
            retried = [t for t in listed if t["nodes"] == ["a", "b"]]
            assert retried, listed  # the rotation puts a first at least once in four
            joined = await (await client.get(f"/admin/traces/{retried[0]['id']}")).json()
            assert set(joined["nodes"]) == {"a", "b"}
            assert "error" in joined["nodes"]["a"] and joined["neuron"] == joined["nodes"]["b"]
            stream = next(t for t in listed if t["stream"])
            assert stream["completion_tokens"] and stream["ttft_s"] is not None
            assert (await client.get("/admin/traces/none-such")).status == 404
            assert (await client.get("/admin/traces?limit=0")).status == 400
            two = (await (await client.get("/admin/traces?limit=2")).json())["traces"]
            assert [t["id"] for t in two] == ["t3", "t2"]
    finally:
        await stop_all([a, b])


async def test_cortex_health_says_when_its_journal_only_counts(tmp_path: Path) -> None:
    """A floor above the disk's free space: no file, the count rises with each trace,
    /health says so and its verdict stays what the fleet makes it."""
    (a,) = await fleet("a")
    try:
        a.add_model("m1")
        floor = shutil.disk_usage(tmp_path).free // MB + 10**6
        async with gateway(
            [a], journal_dir=str(tmp_path), journal_min_free_mb=float(floor)
        ) as client:
            counts = []
            for _ in range(3):
                assert (await client.post(CHAT, json=chat())).status == 200
                assert client.app is not None
                traces = client.app[TRACES]
                assert traces.file is not None
                await asyncio.to_thread(traces.file.flush)
                body = await (await client.get("/health")).json()
                assert body["status"] == "ok"
                assert body["journal"].startswith("counting-only, ")
                assert body["journal_files"]["traces"].startswith("counting-only, ")
                counts.append(int(body["journal"].split(", ")[1].split()[0]))
            assert counts == sorted(counts) and counts[0] < counts[-1]
            assert not await asyncio.to_thread(lambda: list(tmp_path.glob("*.jsonl*")))
            assert len(client.app[TRACES]) == 3  # the ring still keeps them
    finally:
        await stop_all([a])
