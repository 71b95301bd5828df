"""POST /v1/embeddings through cortex: routed as chat is, to a real embedding runner.

One neuron and one cortex for the module; the catalogue holds the demo encoder
(kind "embedding", loaded on the first request) and the demo chat model. The
clients are the openai SDK, as retrieval tools use it, and LangChain's
OpenAIEmbeddings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from neuron.store.demo_encoder import DEMO_DIMENSIONS
from tests.conftest import NeuronProcess, http_json, stop_quietly
from tests.e2e.conftest import CortexProcess

EMBED = f"embed-{uuid.uuid4().hex[:8]}"
CHAT = f"chat-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, demo_encoder: Path, demo_model: Path
) -> Iterator[CortexProcess]:
    root = tmp_path_factory.mktemp("embed-fleet")
    n = NeuronProcess.start(root / "neuron")
    models: list[dict[str, Any]] = [
        {"id": EMBED, "source": str(demo_encoder), "kind": "embedding", "aliases": [f"{EMBED}-a"]},
        {"id": CHAT, "source": str(demo_model)},
    ]
    cortex = CortexProcess.write(root / "cortex", [("a", n)], models)
    try:
        yield cortex.start()
    finally:
        cortex.stop()
        stop_quietly(n)


def client(cortex: CortexProcess, retries: int = 0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=cortex.url + "/v1", api_key="unused", max_retries=retries)


def vectors(answer: Any) -> np.ndarray[Any, Any]:
    assert [d.index for d in answer.data] == list(range(len(answer.data)))
    return np.array([d.embedding for d in answer.data], dtype=np.float64)


async def test_a_cold_encoder_is_loaded_on_demand(fleet: CortexProcess) -> None:
    """Nothing loaded; the first request loads the encoder (the SDK retries the 503s
    model_loading, after their Retry-After) and gets its vectors."""
    before = fleet.model(EMBED)
    assert not before["loaded"] and before["kind"] == "embedding"
    async with client(fleet, retries=30) as c:
        r = await c.embeddings.create(model=EMBED, input=["hello", "world"])
    assert vectors(r).shape == (2, DEMO_DIMENSIONS)
    after = fleet.model(EMBED)
    assert after["loaded"] and [loc["node"] for loc in after["locations"]] == ["a"]
    assert fleet.model(CHAT)["kind"] == "chat" and not fleet.model(CHAT)["loaded"]


async def test_shape_unit_length_determinism_and_batching(fleet: CortexProcess) -> None:
    """n x dims unit vectors; the same input twice gives the same bits; a batch of many
    equals its inputs sent one by one; base64 and floats agree."""
    texts = [f"document {i}: " + "fox " * (i % 30) for i in range(120)]
    async with client(fleet, retries=30) as c:
        batch = vectors(await c.embeddings.create(model=EMBED, input=texts))
        once = await c.embeddings.create(model=EMBED, input=texts[7])
        twice = await c.embeddings.create(model=EMBED, input=texts[7])
        floats = await c.embeddings.create(model=EMBED, input=texts[7], encoding_format="float")
    assert batch.shape == (120, DEMO_DIMENSIONS)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert once.data[0].embedding == twice.data[0].embedding
    assert np.abs(batch[7] - vectors(once)[0]).max() < 1e-5
    assert np.array_equal(
        np.array(once.data[0].embedding, dtype=np.float32),
        np.array(floats.data[0].embedding, dtype=np.float32),
    )
    assert once.model == EMBED


async def test_an_alias_answers_under_its_own_name(fleet: CortexProcess) -> None:
    """Asked by alias, the answer names the alias, as chat answers do."""
    async with client(fleet, retries=30) as c:
        r = await c.embeddings.create(model=f"{EMBED}-a", input="hi")
    assert r.model == f"{EMBED}-a"


async def test_the_error_contract(fleet: CortexProcess) -> None:
    """Unknown model 404; a chat model asked for embeddings 400; the encoder asked to chat
    400; a bad input 400 naming `input`: none of them retried or loading anything."""
    async with client(fleet) as c:
        with pytest.raises(NotFoundError):
            await c.embeddings.create(model="no-such-model", input="hi")
        with pytest.raises(BadRequestError) as wrong_kind:
            await c.embeddings.create(model=CHAT, input="hi")
        with pytest.raises(BadRequestError) as chat_on_encoder:
            await c.chat.completions.create(
                model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        with pytest.raises(BadRequestError) as bad_input:
            await c.embeddings.create(model=EMBED, input=[[]])
        with pytest.raises(BadRequestError) as bad_dims:
            await c.embeddings.create(model=EMBED, input="hi", dimensions=DEMO_DIMENSIONS * 2)
    assert "kind 'chat'" in wrong_kind.value.message
    assert "embedding model" in chat_on_encoder.value.message
    for err, param in ((wrong_kind, "model"), (bad_input, "input"), (bad_dims, "dimensions")):
        assert err.value.body["param"] == param, err.value.body  # type: ignore[index]
    assert not fleet.model(CHAT)["loaded"]  # refused by cortex, never routed
    status, body = http_json(fleet.url + "/v1/embeddings", {"model": EMBED})
    assert status == 400 and body["error"]["param"] == "input"


def test_langchain_openai_embeddings(fleet: CortexProcess) -> None:
    """LangChain's OpenAIEmbeddings, with ctx-length checking off (else it sends tiktoken
    ids of another vocabulary), embeds documents and a query."""
    embeddings_mod = pytest.importorskip("langchain_openai")
    emb = embeddings_mod.OpenAIEmbeddings(
        model=EMBED,
        base_url=fleet.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=30,
    )
    docs = emb.embed_documents(["first document", "second one"])
    query = emb.embed_query("first document")
    assert len(docs) == 2 and all(len(d) == DEMO_DIMENSIONS for d in docs)
    assert np.abs(np.array(query) - np.array(docs[0])).max() < 1e-5


async def test_doctor_probes_the_encoder_as_an_encoder(fleet: CortexProcess) -> None:
    """doctor's probe of a ready encoder is an embeddings request, so it answers."""
    async with client(fleet, retries=30) as c:
        await c.embeddings.create(model=EMBED, input="loaded")
    status, report = fleet.get("/admin/doctor")
    assert status == 200, report
    (check,) = [
        c for c in report["checks"] if c["name"] == "model answers" and c.get("model") == EMBED
    ]
    assert check["verdict"] in ("pass", "warn"), check
