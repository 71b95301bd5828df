"""The real LiteLLM proxy, with the shipped packaging/litellm/config.yaml, in front of a real fleet.

This is how users run LiteLLM: `litellm --config config.yaml` as its own
server, clients speaking OpenAI to it. The module starts it once (it takes
seconds), on loopback, with only what the file says to set in its environment
(LITELLM_MASTER_KEY, CORTEX_API_BASE, CORTEX_API_KEY, HF_HUB_OFFLINE), in front
of one real cortex over one real neuron and mlx_lm runner (the demo model),
and drives it with the OpenAI SDK. What cortex saw is read from its /metrics.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import attrs
import openai
import pytest

from tests.conftest import (
    LONG_STREAM,
    TEST_ROOT,
    NeuronProcess,
    free_port,
    http_json,
    kill_pid,
    runner_pids,
    stop_quietly,
    wait_until,
)
from tests.e2e.conftest import CortexProcess

CONFIG = Path(__file__).parents[2] / "packaging" / "litellm" / "config.yaml"
LITELLM = Path(sys.executable).parent / "litellm"
MASTER_KEY = f"sk-test-{uuid.uuid4().hex}"
MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]
REAL = "smollm2-135m"

pytestmark = pytest.mark.skipif(
    not LITELLM.exists(), reason=f"no LiteLLM proxy at {LITELLM} (pip install 'litellm[proxy]')"
)


@attrs.frozen
class Stack:
    """LiteLLM proxy -> cortex -> neuron -> runner; `demo` is a cortex alias of `model`."""

    cortex: CortexProcess
    neuron: NeuronProcess
    model: str
    litellm_url: str
    litellm_log: Path

    def client(self, **kw: Any) -> openai.OpenAI:
        # max_retries=0: any retry seen is LiteLLM's, not the SDK's.
        return openai.OpenAI(
            base_url=self.litellm_url + "/v1", api_key=MASTER_KEY, max_retries=0, **kw
        )


def _start_litellm(dir: Path, api_base: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": MASTER_KEY,
        "CORTEX_API_BASE": api_base,
        "CORTEX_API_KEY": "unused-cortex-auth-is-off",
        "HF_HUB_OFFLINE": "1",
        # No fetches from GitHub at start, no .env, no telemetry: no network here.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
        "LITELLM_LOCAL_BLOG_POSTS": "True",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("DATABASE_URL", None)
    log_path = dir / "litellm.log"
    log = log_path.open("ab")
    proc = subprocess.Popen(
        [str(LITELLM), "--config", str(CONFIG), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=dir,
        env=env,
        start_new_session=True,
    )
    log.close()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"litellm exited early:\n{log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url + "/health/liveliness", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_until(up, 120, "the LiteLLM proxy to answer /health/liveliness")
    except BaseException:
        _stop(proc)
        raise
    return proc, url, log_path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path, real_model: Path
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("litellm-proxy")
    # One request at a time and no queue: a held stream makes cortex answer 429.
    # A runner SIGSTOPped under a held stream keeps the slot for as long as a test
    # needs it: the heartbeat must not find it stalled (nor kill it) meanwhile.
    neuron = NeuronProcess.start(
        root / "neuron",
        {
            "admission": {"max_in_flight": 1, "max_queue": 0},
            "runner": {"stall_timeout_s": 600.0, "health_check_interval_s": 3600.0},
            "model_roots": [*map(str, TEST_ROOT), str(real_model.parent)],
        },
    )
    model = f"llp-{uuid.uuid4().hex[:8]}"  # unique on this machine; `demo` is its alias
    cortex = CortexProcess.write(
        root / "cortex",
        [("a", neuron)],
        [
            {"id": model, "source": str(demo_model), "aliases": ["demo"]},
            # In the shipped config.yaml: the one model here whose answers mean something.
            {"id": REAL, "source": str(real_model)},
        ],
    )
    proc = None
    try:
        cortex.start()
        proc, url, log = _start_litellm(root, cortex.url + "/v1")
        yield Stack(cortex=cortex, neuron=neuron, model=model, litellm_url=url, litellm_log=log)
    finally:
        if proc is not None:
            _stop(proc)
        cortex.stop()
        stop_quietly(neuron)


def _requests(c: CortexProcess, model: str) -> dict[str, float]:
    """cortex_requests_total for one model label, by code (non-zero series only)."""
    with urllib.request.urlopen(c.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cortex_requests_total{") and f'model="{model}"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            out[code] = out.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    return {code: n for code, n in out.items() if n}


def _loaded(s: Stack) -> bool:
    return bool(s.cortex.model(s.model)["loaded"])


# Tests run in file order: the first finds the model cold, the last kills its runner.


def test_a_cold_load_is_invisible_to_the_caller(stack: Stack) -> None:
    """Not loaded at start; the first chat through LiteLLM succeeds, cortex held it."""
    assert not _loaded(stack)
    with stack.client() as client:
        resp = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4)
    assert resp.choices[0].message.content
    # cortex waited for the load (load_wait_s) instead of answering 503: one request.
    assert _requests(stack.cortex, stack.model) == {"200": 1.0}
    assert _loaded(stack)


def test_chat_and_stream(stack: Stack) -> None:
    """A chat and a stream through the proxy carry the runner's tokens, the same greedy answer."""
    kw: dict[str, Any] = {"model": "demo", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    with stack.client() as client:
        text = client.chat.completions.create(**kw).choices[0].message.content
        assert text
        with client.chat.completions.create(**kw, stream=True) as stream:
            chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "tokens arrive as several chunks"
    assert "".join(pieces) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_an_unknown_model_is_a_404_sent_once(stack: Stack) -> None:
    """A model cortex does not know: NotFoundError, and cortex saw exactly one request."""
    before = _requests(stack.cortex, "other").get("404", 0.0)
    with stack.client() as client, pytest.raises(openai.NotFoundError) as exc:
        # In the shipped config, but not in this fleet's catalogue.
        client.chat.completions.create(model="llama-3.2-3b", messages=MESSAGES, max_tokens=4)
    assert "llama-3.2-3b" in str(exc.value)
    assert _requests(stack.cortex, "other").get("404", 0.0) == before + 1


def test_a_full_queue_is_retried_after_retry_after(stack: Stack) -> None:
    """429 queue_full + Retry-After: 1 while a stream holds the slot; LiteLLM waits, retries, wins.

    LiteLLM's Router sleeps the upstream's Retry-After (when 0 < it <= 60) before
    each retry of a single deployment, so every 429 cortex counted is followed by
    at least 1 s before the next attempt: the call lasts at least that long.
    """
    before = _requests(stack.cortex, stack.model)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        with stack.client() as client:
            # The one slot is taken, and stays taken until two 429s were counted.
            with _slot_held(stack):
                started = time.monotonic()
                future = pool.submit(
                    client.chat.completions.create, model="demo", messages=MESSAGES, max_tokens=4
                )

                def rejected() -> float:
                    return _requests(stack.cortex, stack.model).get("429", 0.0) - before.get(
                        "429", 0
                    )

                wait_until(lambda: rejected() >= 2, 60, "two 429s at cortex")
            # The hold closed: the slot is free (within the 3 s or more of Retry-After
            # waits left), and a later retry gets through.
            resp = future.result(timeout=120)
            elapsed = time.monotonic() - started
        assert resp.choices[0].message.content
        n = rejected()
        assert 2 <= n <= 5, n  # num_retries: 5 in config.yaml
        # A lower bound (LiteLLM sleeps Retry-After before each retry): a slow machine
        # only adds to it.
        assert elapsed >= n * 1.0, (elapsed, n)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_the_real_model_answers_through_the_proxy(stack: Stack) -> None:
    """smollm2-135m, cold, streamed through LiteLLM and cortex: the answer says Paris."""
    question: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
    with stack.client() as client:
        stream = client.chat.completions.create(
            model=REAL, messages=question, max_tokens=24, temperature=0, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Paris" in text, text
    assert _requests(stack.cortex, REAL) == {"200": 1.0}, "the cold load was invisible"


def _slot_free(s: Stack) -> bool:
    """The neuron's one slot is free: a stream a test closed has ended there too."""
    status, health = http_json(s.neuron.url + "/health")
    return status == 200 and all(m["in_flight"] == 0 for m in health["models"])


@contextlib.contextmanager
def _slot_held(s: Stack) -> Iterator[None]:
    """A stream holds the neuron's only slot, its runner SIGSTOPped so that it never ends.

    A live stream would end by itself after its context's worth of tokens, sooner
    on a faster machine: then LiteLLM's later retries would get through.
    """
    wait_until(lambda: _slot_free(s), 60, "the neuron's slot to be free")
    direct = openai.OpenAI(base_url=s.cortex.url + "/v1", api_key="x", max_retries=0)
    hold = direct.chat.completions.create(
        model=s.model, messages=MESSAGES, stream=True, extra_body=LONG_STREAM
    )
    (pid,) = runner_pids(s.model, parent=s.neuron.process.pid)
    try:
        next(iter(hold))
        kill_pid(pid, signal.SIGSTOP)
        yield
    finally:
        kill_pid(pid, signal.SIGCONT)
        hold.close()
        direct.close()


def test_a_queue_full_to_the_end_is_passed_on_after_the_retries(stack: Stack) -> None:
    """Still full after config.yaml's 5 retries: 6 tries at cortex, then a RateLimitError.

    LiteLLM honours Retry-After itself rather than passing it through.
    """
    before = _requests(stack.cortex, stack.model).get("429", 0.0)
    with (
        _slot_held(stack),
        stack.client() as client,
        pytest.raises(openai.RateLimitError) as exc,
    ):
        client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4)
    assert _requests(stack.cortex, stack.model).get("429", 0.0) - before == 6
    # LiteLLM answers its client with the 429 and cortex's message...
    assert "queue" in str(exc.value) or "capacity" in str(exc.value), str(exc.value)
    # ...and cortex's Retry-After only renamed (LiteLLM prefixes every upstream
    # header): an OpenAI SDK client of LiteLLM does not see it as one.
    headers = exc.value.response.headers
    assert headers.get("llm_provider-retry-after") == "1", dict(headers)
    assert "retry-after" not in headers, dict(headers)


def test_a_runner_lost_mid_stream_is_an_error_not_a_short_success(stack: Stack) -> None:
    """SIGKILL the runner mid-stream: the SDK raises; it never sees a clean finish."""
    with stack.client() as client:
        stream = client.chat.completions.create(
            model="demo", messages=MESSAGES, stream=True, extra_body=LONG_STREAM
        )
        got: list[Any] = []
        with pytest.raises(openai.APIError) as exc:
            for chunk in stream:
                got.append(chunk)
                if len(got) == 3:
                    (pid,) = runner_pids(stack.model, parent=stack.neuron.process.pid)
                    kill_pid(pid)
        stream.close()
    assert len(got) >= 3
    assert not any(c.choices and c.choices[0].finish_reason for c in got), "no clean finish"
    assert "lost" in str(exc.value) or "runner" in str(exc.value), str(exc.value)


def test_the_messages_api_through_the_proxy(stack: Stack) -> None:
    """The anthropic SDK at LiteLLM's /v1/messages with the shipped config: its `openai/`
    provider asks cortex's /v1/responses (a 404 before issue 18); the answer says Paris."""
    with anthropic.Anthropic(
        base_url=stack.litellm_url, api_key=MASTER_KEY, max_retries=0, timeout=180
    ) as client:
        msg = client.messages.create(
            model=REAL,
            max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert "Paris" in text, msg
