"""The OpenAI API's details, read by the openai SDK through a real cortex, neuron and runner.

The id a client asked for comes back in every answer and chunk (mlx_lm.server
would say "default_model"), `system_fingerprint` names no host,
`client.models.retrieve` works on cortex and on the neuron, `created` is a real
time, and `stream_options.include_usage` gives the usage chunk.
"""

from __future__ import annotations

import platform
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        [{"id": model, "source": str(demo_model), "keep_loaded": True, "aliases": [model + "-a"]}],
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
