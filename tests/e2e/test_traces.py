"""Traces and the event log through a real fleet: cortex, a neuron, a real runner.

One fleet for the whole story (two cores): a streamed request traced on both
sides under the client's X-Request-Id, the load and unload in /admin/events and
cortex's events.jsonl, the neuron's journal under a floor above the disk's free
space (counting only, /health says so), and `cortex trace` / `cortex events`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai

from tests.conftest import NeuronProcess, http_json, wait_until
from tests.e2e.conftest import CortexProcess

ADMIN = "admin-token-for-traces"
RID = "client-trace-0001"


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(url),
    )


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "CORTEX_URL": url, "CORTEX_ADMIN_TOKEN": ADMIN}


def _read_until(stream: Any, text: str) -> None:
    while True:
        line = stream.readline()
        assert line, f"the follower ended before printing {text!r}"
        if text in line:
            return


def _admin(c: CortexProcess, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    return http_json(c.url + path, body, timeout=60, token=ADMIN)


def test_trace_joined_events_rotation_floor_and_clis(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "fleet.token"
    token_file.write_text("fleet-token-for-traces-0123456789\n")
    neuron_journal = tmp_path / "neuron-journal"
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    a: NeuronProcess = neuron_factory(
        {
            "fleet_token_file": str(token_file),
            "node_name": "a",
            "journal_dir": str(neuron_journal),
            # Above the disk's free space: the neuron's journals only count.
            "journal_min_free_mb": float(free_mb + 10**6),
        },
        name="a",
    )
    cortex_journal = tmp_path / "cortex-journal"
    c: CortexProcess = cortex_factory(
        [("a", a)],
        [{"id": model_id, "source": str(demo_model)}],
        admin_token=ADMIN,
        fleet_token_file=str(token_file),
        journal_dir=str(cortex_journal),
        journal_min_free_mb=0.0,
    )
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 1, 30, "the node healthy")

    # A streamed request (a cold load first) with the client's own id.
    client = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model_id,
            messages=[{"role": "user", "content": "hello there"}],
            # Long enough to time (shared.rates: a rate needs >= 0.1 s of decoding);
            # the demo model's end token banned, so it runs to max_tokens.
            max_tokens=256,
            logit_bias={"1": -100},
            stream=True,
            extra_headers={"X-Request-Id": RID},
        )
        assert raw.headers["x-request-id"] == RID
        chunks = list(raw.parse())
    finally:
        client.close()
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)

    # The joined view: cortex's part and the neuron's, same id. Each is kept as its
    # handler ends, which may be just after the client has read [DONE]: waited for.
    def both_parts() -> Any:
        status, joined = _admin(c, f"/admin/traces/{RID}")
        found = status == 200 and (joined.get("neuron") or {}).get("id") == RID
        return joined if found else None

    joined = wait_until(both_parts, 60, "the request's trace at cortex and at the neuron")
    assert joined["id"] == RID
    ct = joined["cortex"]
    assert ct["id"] == RID and ct["model"] == model_id and ct["stream"] is True
    assert ct["node"] == "a" and ct["nodes"] == ["a"] and ct["status"] == "200"
    assert ct["ttft_s"] is not None and ct["ttft_s"] > 0
    assert ct["completion_tokens"] is not None and ct["completion_tokens"] >= 1
    assert ct["cold_load_s"] is not None  # it waited for the load it caused
    assert ct["queue_wait_s"] is not None  # the neuron's admission wait, from its header
    nt = joined["neuron"]
    assert nt["id"] == RID and nt["model"] == model_id and nt["status"] == "200"
    assert nt["prompt_tokens"] is not None and nt["prompt_tokens"] > 0  # its tokenizer
    # Cortex's counts are the neuron's (its usage comment: the client asked no usage).
    assert ct["tokens_from"] == "usage"
    assert ct["completion_tokens"] == nt["completion_tokens"]
    assert ct["prompt_tokens"] == nt["runner_prompt_tokens"] > 0
    # A rate only over a real interval (shared.rates): None for a stream too quick to time.
    assert ct["tok_s"] is None or ct["tok_s"] > 0
    assert nt["ttft_s"] is not None and nt["runner"].startswith("pid ")
    assert joined["nodes"]["a"] == nt
    # The runner's log (where the request id is noted, to match its output with the
    # trace) is held to the same floor: counted, not written.
    storage = a.get("/store/storage")[1]["runner_logs"]
    assert [w["counting_only"] for w in storage["not_written"]] == [True], storage

    # Listing: newest first, filters.
    _admin(c, f"/admin/models/{model_id}/load", {})  # idempotent, no trace
    status, listed = _admin(c, f"/admin/traces?model={model_id}&status=200&limit=5")
    assert status == 200 and [t["id"] for t in listed["traces"]] == [RID]
    assert _admin(c, "/admin/traces?model=nope")[1] == {"traces": []}
    # Behind the admin token.
    assert http_json(c.url + "/admin/traces")[0] == 401
    assert http_json(c.url + f"/admin/traces/{RID}")[0] == 401
    assert http_json(c.url + "/admin/events")[0] == 401

    # The load is in the event log, with a seq to follow from.
    status, ev = _admin(c, f"/admin/events?model={model_id}")
    assert status == 200
    kinds = [e["kind"] for e in ev["events"]]
    assert "load started" in kinds and "ready" in kinds, kinds
    assert all(set(e) == {"seq", "ts", "kind", "model", "node", "detail"} for e in ev["events"])
    seqs = [e["seq"] for e in ev["events"]]
    assert seqs == sorted(seqs) and ev["last_seq"] >= seqs[-1]
    # The poller saw the node report it ready: a transition with the node named.
    wait_until(
        lambda: any(
            e["node"] == "a" and e["kind"] == "ready" and "->" in e["detail"]
            for e in _admin(c, f"/admin/events?model={model_id}&node=a")[1]["events"]
        ),
        30,
        "the polled transition to ready",
    )
    mark = _admin(c, "/admin/events")[1]["last_seq"]

    # `cortex trace` and `cortex events` against this cortex.
    shown = _cli("trace", RID, url=c.url)
    assert shown.returncode == 0, shown.stderr
    assert f"request {RID}" in shown.stdout and "answered by a" in shown.stdout
    assert "neuron a:" in shown.stdout and "first token" in shown.stdout
    as_json = _cli("trace", RID, "--json", url=c.url)
    assert json.loads(as_json.stdout)["cortex"]["id"] == RID
    missing = _cli("trace", "no-such-id", url=c.url)
    assert missing.returncode == 1 and "no trace" in missing.stderr
    listed_ev = _cli("events", "--model", model_id, url=c.url)
    assert listed_ev.returncode == 0 and "load started" in listed_ev.stdout
    lines = _cli("events", "--json", url=c.url).stdout.splitlines()
    assert lines and all("seq" in json.loads(line) for line in lines)

    # --follow prints what happens next: the unload; Ctrl-C exits 130.
    follow = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "events", "--follow", "--model", model_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(c.url),
    )
    try:
        assert follow.stdout is not None
        _read_until(follow.stdout, "load started")  # the backlog first
        status, unloaded = _admin(c, f"/admin/models/{model_id}/unload", {})
        assert status == 200, unloaded
        _read_until(follow.stdout, "unload")
    finally:
        follow.send_signal(signal.SIGINT)
        # communicate, not wait: a follower whose stdout pipe is full cannot exit.
        follow.communicate(timeout=60)
    assert follow.returncode == 130
    status, ev = _admin(c, f"/admin/events?since={mark}")
    assert status == 200
    assert all(e["seq"] > mark for e in ev["events"])
    assert "unload" in [e["kind"] for e in ev["events"] if e["model"] == model_id]

    # The neuron journaled its runner's life; its journals only count, and say so.
    status, nev = http_json(a.url + f"/events?model={model_id}", token=a.token)
    assert status == 200
    nkinds = [e["kind"] for e in nev["events"]]
    assert nkinds[:2] == ["runner start", "ready"] and "stop" in nkinds and "stopped" in nkinds
    assert all(e["node"] == "a" for e in nev["events"])
    assert http_json(a.url + "/events")[0] == 401  # the fleet token
    health = a.get("/health")[1]
    assert health["journal"].startswith("counting-only, ")
    dropped = int(health["journal"].split(", ")[1].split()[0])
    assert dropped >= len(nev["events"]) + 1  # every event and the trace
    assert health["status"] in ("idle", "busy")  # the verdict is unchanged
    assert not any(neuron_journal.glob("*.jsonl*"))  # nothing written
    # ... and the ring still answers.
    assert http_json(a.url + f"/traces/{RID}", token=a.token)[1]["id"] == RID

    # Cortex wrote its journals: valid JSONL holding the same events.
    wait_until(lambda: '"unload"' in (cortex_journal / "events.jsonl").read_text(), 30, "the file")
    recs = [json.loads(x) for x in (cortex_journal / "events.jsonl").read_text().splitlines()]
    assert {"load started", "ready", "unload"} <= {r["kind"] for r in recs}
    traces = [json.loads(x) for x in (cortex_journal / "traces.jsonl").read_text().splitlines()]
    assert RID in [t["id"] for t in traces]
    ch = c.get("/health")[1]
    assert ch["journal"] == "writing" and "writing" in ch["journal_files"]["events"]
