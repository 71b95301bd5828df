"""The request path against real runners: poison fields, context, broken runners, disconnects."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.assemble import assemble, data_events
from tests.conftest import LONG_STREAM, NeuronProcess, runner_pids, stop_quietly, wait_until

MODEL = "demo"
BIG = "demo-big"  # the demo model with a context of a million tokens
CHAT = [{"role": "user", "content": "Once upon a time"}]
TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def neuron(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[NeuronProcess]:
    root = tmp_path_factory.mktemp("neuron-request-path")
    big = root / "big-model"
    shutil.copytree(demo_model, big)
    config = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**6}))
    # The periodic /health read is off: the request path must find broken runners itself.
    n = NeuronProcess.start(
        root / "neuron",
        {"heartbeat_s": 0.2, "runner": {"health_check_interval_s": 3600.0}},
    )
    try:
        n.load_ready(MODEL, demo_model)
        n.load_ready(BIG, big)
        yield n
    finally:
        stop_quietly(n)


async def post(n: NeuronProcess, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(n.url + path, json=body) as r:
        return r.status, await r.json()


def metric(n: NeuronProcess, name: str, **labels: str) -> float:
    text = aiohttp_free_get(n, "/metrics")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def aiohttp_free_get(n: NeuronProcess, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(n.url + path, timeout=10) as r:
        return str(r.read().decode())


def runner_port(n: NeuronProcess, model_id: str) -> int:
    m = n.model(model_id)
    assert m is not None and m["port"], m
    return int(m["port"])


POISON: list[tuple[str, dict[str, Any], str]] = [
    ("chat", {"stop": [123]}, "stop"),
    ("chat", {"logit_bias": {"100000": 5}}, "logit_bias"),
    ("chat", {"tools": "x"}, "tools"),
    ("chat", {"messages": [{"role": "user", "content": "\ud800 lone"}]}, "messages"),
    ("chat", {"top_k": 10**6}, "top_k"),
    ("chat", {"seed": -5}, "seed"),
    ("completions", {"prompt": 123}, "prompt"),
    ("completions", {"prompt": ["a", 1]}, "prompt"),
]


@pytest.mark.parametrize(("kind", "extra", "param"), POISON)
async def test_poison_field_is_400_and_the_runner_stays_ready(
    neuron: NeuronProcess, kind: str, extra: dict[str, Any], param: str
) -> None:
    """Each field that broke or crashed a runner: 400 naming it; same runner answers next."""
    pids = runner_pids(MODEL, parent=neuron.process.pid)
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    base: dict[str, Any] = {"messages": CHAT} if kind == "chat" else {"prompt": "Once"}
    status, body = await post(neuron, path, {"model": MODEL, "max_tokens": 4, **base, **extra})
    assert status == 400, body
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] == param
    status, body = await post(
        neuron, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    )
    assert status == 200, body
    assert runner_pids(MODEL, parent=neuron.process.pid) == pids
    assert neuron.model(MODEL)["state"] == "ready"  # type: ignore[index]


@pytest.mark.parametrize("field", ["draft_model", "adapters"])
async def test_client_paths_never_reach_the_runner(neuron: NeuronProcess, field: str) -> None:
    """A path of the client's choosing is dropped (the runner would try to open it)."""
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, field: "/nonexistent/x"}
    status, answer = await post(neuron, "/v1/chat/completions", body)
    assert status == 200, answer
    if field == "adapters":
        return  # the runner maps its own model to its own adapters; dropped all the same
    # Sent to the runner itself, the same body fails: the test would see it.
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{runner_port(neuron, MODEL)}/v1/chat/completions"
        async with s.post(url, json={**body, "model": "default_model"}) as r:
            assert r.status != 200


async def test_huge_max_tokens_is_capped_at_the_context(
    neuron: NeuronProcess, demo_model: Path
) -> None:
    """max_tokens 1e9 with EOS banned ends at the context, not after a billion tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    ids = tok.encode(" ".join(f"w{i}" for i in range(3000)), add_special_tokens=False).ids
    prompt = tok.decode(ids[:3900])  # about 200 tokens of context left
    body = {"model": MODEL, "prompt": prompt, **LONG_STREAM, "max_tokens": 10**9}
    status, answer = await post(neuron, "/v1/completions", body)
    assert status == 200, answer
    usage = answer["usage"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 4096
    assert usage["completion_tokens"] > 100


async def test_prompt_over_the_context_is_400_before_the_runner(neuron: NeuronProcess) -> None:
    """Over the 4096-token context: 400 naming the prompt; nothing reached the runner."""
    before = metric(neuron, "neuron_requests_total", model=MODEL, outcome="ok")
    words = " ".join(f"w{i}" for i in range(5000))
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/completions", {"prompt": words}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": words}]}, "messages"),
        ("/v1/completions", {"prompt": "x" * 2_000_000}, "prompt"),
    ]
    for path, body, param in cases:
        status, answer = await post(neuron, path, {"model": MODEL, **body})
        assert status == 400, answer
        assert answer["error"]["param"] == param
    assert metric(neuron, "neuron_requests_total", model=MODEL, outcome="ok") == before


async def test_unary_answer_assembled_from_the_stream_equals_the_runners_own(
    neuron: NeuronProcess,
) -> None:
    """Temperature 0, one seed: the runner's unstreamed answer, and the neuron's from chunks."""
    port = runner_port(neuron, MODEL)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "Once upon a time"}),
    ]
    for path, body in cases:
        body = {"model": "default_model", "max_tokens": 24, "temperature": 0, "seed": 3, **body}
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{port}{path}"
            async with s.post(url, json=body) as r:
                own = await r.json()
            streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with s.post(url, json=streamed) as r:
                raw = await r.read()
        mine = assemble(data_events(raw))
        got = (await post(neuron, path, {**body, "model": MODEL}))[1]
        for answer in (mine, got):
            assert answer["object"] == own["object"]
            assert answer["choices"][0]["finish_reason"] == own["choices"][0]["finish_reason"]
            key = "message" if own["object"] == "chat.completion" else "text"
            assert answer["choices"][0][key] == own["choices"][0][key]
            usage = {k: own["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
            assert {k: answer["usage"][k] for k in usage} == usage
        assert mine["id"] and mine["created"] and mine["model"] == own["model"]


async def test_usage_frame_only_for_clients_that_ask(neuron: NeuronProcess) -> None:
    """The runner is always asked for usage; a client sees it only if it asked."""
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "stream": True}
    tokens_before = metric(neuron, "neuron_tokens_total", model=MODEL, kind="completion")
    async with aiohttp.ClientSession() as s:
        async with s.post(neuron.url + "/v1/completions", json=body) as r:
            plain = [e for e in data_events(await r.read())]
        with_usage = {**body, "stream_options": {"include_usage": True}}
        async with s.post(neuron.url + "/v1/completions", json=with_usage) as r:
            asked = [e for e in data_events(await r.read())]
    assert not any("usage" in e for e in plain), plain
    assert asked[-1]["usage"]["completion_tokens"] >= 1, asked
    counted = metric(neuron, "neuron_tokens_total", model=MODEL, kind="completion")
    assert counted - tokens_before >= 2


async def test_health_counts_completion_tokens_as_usage_reports_them(
    neuron: NeuronProcess,
) -> None:
    """/health's completion_tokens (the counter cortex's dashboard turns into tok/s) grows
    by what each answer's usage says, streamed or not, in step with neuron_tokens_total."""

    def counter() -> int:
        _, health = neuron.get("/health")
        (m,) = [m for m in health["models"] if m["model_id"] == MODEL]
        return int(m["completion_tokens"])

    before = counter()
    metric_before = metric(neuron, "neuron_tokens_total", model=MODEL, kind="completion")
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 5}
    status, answer = await post(neuron, "/v1/completions", body)
    assert status == 200, answer
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with (
        aiohttp.ClientSession() as s,
        s.post(neuron.url + "/v1/completions", json=streamed) as r,
    ):
        events = list(data_events(await r.read()))
    used = answer["usage"]["completion_tokens"] + events[-1]["usage"]["completion_tokens"]
    assert used >= 2
    assert counter() - before == used
    counted = metric(neuron, "neuron_tokens_total", model=MODEL, kind="completion")
    assert counted - metric_before == used


async def test_generation_thread_died_restarts_the_runner(neuron: NeuronProcess) -> None:
    """A runner whose generation thread died answers 502 once, and is replaced."""
    old = runner_pids(MODEL, parent=neuron.process.pid)
    port = runner_port(neuron, MODEL)
    # `stop: [123]` sent past the neuron, to the runner itself, kills that thread.
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{port}/v1/completions"
        poison = {"model": "default_model", "prompt": "x", "max_tokens": 2, "stop": [123]}
        async with s.post(url, json=poison) as r:
            await r.read()
        async with s.get(f"http://127.0.0.1:{port}/health") as r:
            assert r.status == 503  # the thread is really dead
    status, body = await post(
        neuron, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    )
    assert status == 502, body
    assert body["error"]["code"] == "upstream_error"
    assert "broken" in body["error"]["message"]
    m = neuron.wait_state(MODEL, "recovering")
    assert "generation thread died" in m["error"], m
    _, health = neuron.get("/health")
    assert health["status"] == "degraded"
    neuron.wait_state(MODEL, "ready")
    assert set(runner_pids(MODEL, parent=neuron.process.pid)).isdisjoint(old)
    status, body = await post(
        neuron, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    )
    assert status == 200, body


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_share(pid: int, over_s: float = 1.0) -> float:
    """The runner's CPU over the next `over_s` seconds, in cores."""
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    time.sleep(over_s)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


LONG_PROMPT = " ".join(f"w{i % 997}" for i in range(150_000))


@pytest.mark.parametrize(
    ("what", "body"),
    [
        ("prefill, unary", {"prompt": LONG_PROMPT, "max_tokens": 1}),
        ("prefill, streamed", {"prompt": LONG_PROMPT, "max_tokens": 1, "stream": True}),
        ("decode, unary", {"prompt": "Once", **LONG_STREAM, "max_tokens": 10**9}),
    ],
)
async def test_abandoned_request_stops_the_runner(
    neuron: NeuronProcess, what: str, body: dict[str, Any]
) -> None:
    """The client leaves mid-work: the runner's CPU falls back to idle within seconds."""
    (pid,) = runner_pids(BIG)

    async def send() -> None:
        url = neuron.url + "/v1/completions"
        async with aiohttp.ClientSession() as s, s.post(url, json={"model": BIG, **body}) as r:
            await r.read()

    task = asyncio.create_task(send())
    # Busy: clearly above the idle bound below (a starved machine may give it less
    # than the half core it takes on a quiet one).
    busy = await asyncio.to_thread(
        wait_until, lambda: cpu_share(pid, 0.5) > 0.3, 60, f"runner busy ({what})"
    )
    assert busy and not task.done()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    left = time.monotonic()
    await asyncio.to_thread(
        wait_until, lambda: cpu_share(pid, 1.0) < 0.15, 20, f"runner idle after ({what})"
    )
    print(f"\n{what}: runner idle {time.monotonic() - left:.1f} s after its client left")
    assert runner_pids(BIG) == [pid]
