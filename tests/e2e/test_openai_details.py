"""The OpenAI API's details, read by the openai SDK through a real cortex, neuron and runner.

The id a client asked for comes back in every answer and chunk (mlx_lm.server
would say "default_model"), `system_fingerprint` names no host,
`client.models.retrieve` works on cortex and on the neuron, `created` is a real
time, and `stream_options.include_usage` gives the usage chunk. Completions take
OpenAI's integer `logprobs` and refuse token-id prompts plainly; model ids keep
to their charset (shared.model_id) at the admin API and the neuron's load.
"""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import openai
import pytest

from tests.conftest import NeuronProcess, stop_quietly, wait_until
from tests.e2e.conftest import CortexProcess

MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]


@attrs.frozen
class Stack:
    cortex: CortexProcess
    neuron: NeuronProcess
    model: str
    started: float

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.cortex.url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("openai-details")
    started = time.time()
    neuron = NeuronProcess.start(root / "neuron")
    model = f"oai-{uuid.uuid4().hex[:8]}"
    cortex = CortexProcess.write(
        root / "cortex",
        [("a", neuron)],
        [
            {
                "id": model,
                "source": str(demo_model),
                "keep_loaded": True,
                # A slash, as hub-style ids have: one path parameter of the admin API.
                "aliases": [model + "-a", "org/" + model],
            }
        ],
    )
    try:
        cortex.start()
        wait_until(lambda: cortex.model(model)["loaded"], 120, f"{model} loaded")
        yield Stack(cortex=cortex, neuron=neuron, model=model, started=started)
    finally:
        cortex.stop()
        stop_quietly(neuron)


def _no_host(fingerprint: str | None) -> None:
    # mlx_lm's own fingerprint is `platform.platform()` and more: the kernel release.
    assert fingerprint is None or platform.release() not in fingerprint, fingerprint
    assert fingerprint is None or platform.node() not in fingerprint, fingerprint


def test_answers_and_chunks_carry_the_asked_id_and_no_host(stack: Stack) -> None:
    """Chat, stream (with include_usage), completions and logprobs say the id asked for."""
    with stack.client() as client:
        chat = client.chat.completions.create(model=stack.model, messages=MESSAGES, max_tokens=4)
        assert chat.model == stack.model
        _no_host(chat.system_fingerprint)
        assert chat.usage is not None and chat.usage.completion_tokens == 4

        with client.chat.completions.create(
            model=stack.model,
            messages=MESSAGES,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        ) as stream:
            chunks = list(stream)
        assert chunks and {c.model for c in chunks} == {stack.model}
        for c in chunks:
            _no_host(c.system_fingerprint)
        # The last chunk is the usage report: no choices, the counts.
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 4
        assert all(c.usage is None for c in chunks[:-1])

        # Without include_usage: no usage chunk.
        with client.chat.completions.create(
            model=stack.model, messages=MESSAGES, max_tokens=4, stream=True
        ) as stream:
            plain = list(stream)
        assert plain and all(c.choices and c.usage is None for c in plain)

        text = client.completions.create(model=stack.model, prompt="Hello", max_tokens=4)
        assert text.model == stack.model
        # logprobs go the unstreamed way to the runner (its raw answer, relayed).
        lp = client.chat.completions.create(
            model=stack.model, messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=2
        )
        assert lp.model == stack.model
        _no_host(lp.system_fingerprint)


def test_an_alias_comes_back_as_asked(stack: Stack) -> None:
    """Asked by a catalogue alias, the answer and every chunk name the alias."""
    alias = stack.model + "-a"
    with stack.client() as client:
        chat = client.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=2)
        assert chat.model == alias
        with client.chat.completions.create(
            model=alias, messages=MESSAGES, max_tokens=2, stream=True
        ) as stream:
            assert {c.model for c in stream} == {alias}
        assert client.models.retrieve(alias).id == stack.model  # the entry is the model's


def test_models_retrieve_on_cortex_and_neuron(stack: Stack) -> None:
    """`client.models.retrieve` works on both; `created` is when it was catalogued/loaded."""
    now = time.time()
    with stack.client() as client:
        m = client.models.retrieve(stack.model)
        assert m.id == stack.model and m.object == "model"
        assert stack.started - 1 <= m.created <= now
        assert [x.created for x in client.models.list().data if x.id == stack.model] == [m.created]
        with pytest.raises(openai.NotFoundError) as exc:
            client.models.retrieve("no-such-model")
        assert exc.value.code == "model_not_found"

    with openai.OpenAI(base_url=stack.neuron.url + "/v1", api_key="x", max_retries=0) as direct:
        n = direct.models.retrieve(stack.model)
        assert n.id == stack.model and stack.started - 1 <= n.created <= now
        with pytest.raises(openai.NotFoundError) as exc:
            direct.models.retrieve("no-such-model")
        assert exc.value.code == "model_not_found"


def _raw_completion(client: openai.OpenAI, **kw: Any) -> dict[str, Any]:
    raw = client.completions.with_raw_response.create(max_tokens=3, temperature=0, **kw)
    body: dict[str, Any] = raw.http_response.json()
    return body


def test_completions_integer_logprobs_and_prompt_shapes(stack: Stack) -> None:
    """`logprobs: 2` reaches a real runner as its top-2; `logprobs: 0` as the sampled
    token's; over the runner's limit, ids or a batch for a prompt: 400 saying so."""
    started = time.monotonic()
    with stack.client() as client:
        two = _raw_completion(client, model=stack.model, prompt="Hello", logprobs=2)
        steps = two["choices"][0]["logprobs"]["content"]
        assert len(steps) == 3 and all(len(s["top_logprobs"]) == 2 for s in steps), steps
        assert all(t["logprob"] <= 0 for s in steps for t in s["top_logprobs"])
        zero = _raw_completion(client, model=stack.model, prompt=["Hello"], logprobs=0)
        steps = zero["choices"][0]["logprobs"]["content"]
        assert len(steps) == 3 and all("logprob" in s for s in steps), steps
        refusals: dict[str, dict[str, Any]] = {
            "logprobs": {"prompt": "Hello", "logprobs": 12},
            "token ids": {"prompt": [1, 2, 3]},
            "batch": {"prompt": ["Hello", "World"]},
        }
        for says, kw in refusals.items():
            with pytest.raises(openai.BadRequestError) as exc:
                client.completions.create(model=stack.model, max_tokens=2, **kw)
            assert exc.value.code == "invalid_request" and says in exc.value.message, says
    print(f"\ncompletions logprobs and prompt shapes: {time.monotonic() - started:.2f} s")


def test_model_ids_keep_to_their_charset(stack: Stack) -> None:
    """An id outside the charset: 404 never echoed at inference, 400 at the admin API
    and at a neuron's load; an id with a slash works through the admin API."""
    hostile = "<script>x</script>"
    with stack.client() as client:
        with pytest.raises(openai.NotFoundError) as nf:
            client.completions.create(model=hostile, prompt="Hello", max_tokens=2)
        assert nf.value.code == "model_not_found" and "<script>" not in nf.value.message
    for path in (f"/admin/models/{quote(hostile, safe='')}/load", "/admin/models/a%20b/unload"):
        status, body = stack.cortex.post(path, {})
        assert (status, body["error"]["code"]) == (400, "invalid_request"), (path, body)
        assert "<script>" not in body["error"]["message"]
    status, body = stack.cortex.post("/admin/store/purge", {"model_id": "a b"})
    assert (status, body["error"]["param"]) == (400, "model_id"), body
    status, body = stack.cortex.post(f"/admin/models/org/{stack.model}/load", {})
    assert status == 200 and body["model_id"] == stack.model, body
    status, body = stack.neuron.post("/models/load", {"model_id": hostile, "source": "/x"})
    assert (status, body["error"]["param"]) == (400, "model_id"), body
    assert "<script>" not in body["error"]["message"]
