"""Embedding models in cortex: the catalogue's `kind`, placement, the load request, and
POST /v1/embeddings routed as chat is (cold load, retries, errors) against fake neurons."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cortex.core.placement import candidates
from shared.catalogue import GIB, Catalogue, ModelSpec
from shared.config import ConfigError
from shared.kinds import EMBEDDINGS_PATH, wrong_kind
from shared.wire import FieldError, LoadRequest
from tests.cortex.fakes import FakeNeuron, catalogue, fleet, gateway, stop_all
from tests.cortex.records import node
from tests.support.clients import CHAT, chat

EMBED = ModelSpec(id="e1", source="org/e1", memory_gb=0.1, kind="embedding")


def embeddings(model: str = "e1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": ["hello", "world"], **extra}


# -- the catalogue -------------------------------------------------------------------------


def test_kind_defaults_to_chat_and_reads_embedding(tmp_path: Path) -> None:
    """`kind` is optional (chat); "embedding" marks an encoder."""
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nid = "c"\nsource = "org/c"\n\n'
        '[[models]]\nid = "e"\nsource = "org/e"\nkind = "embedding"\n'
    )
    cat = Catalogue.load(path)
    assert [(m.id, m.kind) for m in cat.models] == [("c", "chat"), ("e", "embedding")]


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ('kind = "rerank"', "'models[0].kind' must be one of 'chat' | 'embedding', not 'rerank'"),
        ('kind = "embedding"\nmin_nodes = 2', "an embedding model runs on one node"),
    ],
)
def test_a_bad_kind_is_a_config_error_naming_it(tmp_path: Path, entry: str, says: str) -> None:
    """An unknown kind, or an encoder spread over nodes: the file refuses to load, saying why."""
    path = tmp_path / "models.toml"
    path.write_text(f'[[models]]\nid = "e"\nsource = "org/e"\n{entry}\n')
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")):
        Catalogue.load(path)


def test_an_encoder_needs_no_kv_cache(demo_encoder: Path) -> None:
    """Placement counts an encoder's weights and no KV cache (it keeps none between requests)."""
    as_chat = ModelSpec(id="x", source=str(demo_encoder)).facts()
    as_encoder = ModelSpec(id="x", source=str(demo_encoder), kind="embedding").facts()
    assert as_encoder.weights_bytes == as_chat.weights_bytes > 0
    assert as_chat.kv_bytes > 0 and as_encoder.kv_bytes == 0


def test_an_encoder_is_placed_on_one_node_or_none() -> None:
    """Too big for any one node: no multi-node set is offered (the runner has no groups)."""
    big = ModelSpec(id="e", source="org/e", memory_gb=40.0, kind="embedding")
    facts = big.facts()
    nodes = [node("a", 64, 30), node("b", 64, 30)]
    cands = candidates(big, facts, nodes)
    assert {c.nodes for c in cands} == {("a",), ("b",)} and not any(c.feasible for c in cands)
    as_chat = ModelSpec(id="c", source="org/c", memory_gb=40.0, kv_gb=0.0, heads=8, kv_heads=8)
    assert any(len(c.nodes) == 2 for c in candidates(as_chat, as_chat.facts(), nodes))
    small = candidates(EMBED, EMBED.facts(), nodes)
    assert [c.feasible for c in small] == [True, True]
    assert small[0].fits[0].kv_bytes == 0 and small[0].fits[0].need_bytes < GIB


# -- the wire --------------------------------------------------------------------------------


def test_the_load_request_carries_the_kind() -> None:
    """Sent only for an encoder (a chat load stays as older neurons read it); checked."""
    chat_load = LoadRequest(model_id="c", source="org/c")
    assert "kind" not in chat_load.to_json()
    load = LoadRequest(model_id="e", source="org/e", kind="embedding")
    assert load.to_json()["kind"] == "embedding"
    assert LoadRequest.from_json(load.to_json()) == load
    with pytest.raises(FieldError) as bad:
        LoadRequest.from_json({"model_id": "e", "kind": "rerank"})
    assert bad.value.param == "kind"
    group = {"group_id": "g", "rank": 0, "world_size": 2, "hosts": ["h:1", "h:2"]}
    with pytest.raises(FieldError) as grouped:
        LoadRequest.from_json({"model_id": "e", "kind": "embedding", "group": group})
    assert grouped.value.param == "group"


def test_wrong_kind_names_the_model_and_its_kind() -> None:
    """Chat on an encoder or embeddings on a chat model: a 400 on `model`; else none."""
    assert wrong_kind("c", "chat", CHAT) is None
    assert wrong_kind("e", "embedding", EMBEDDINGS_PATH) is None
    chat_err = wrong_kind("e", "embedding", CHAT)
    embed_err = wrong_kind("c", "chat", EMBEDDINGS_PATH)
    assert chat_err is not None and embed_err is not None
    assert (chat_err.status, chat_err.param, embed_err.status, embed_err.param) == (
        400,
        "model",
        400,
        "model",
    )
    assert "embedding model" in chat_err.message and "kind 'chat'" in embed_err.message


# -- routed as chat is, against fake neurons ------------------------------------------------


@pytest.fixture
async def two() -> AsyncIterator[list[FakeNeuron]]:
    nodes = await fleet("n1", "n2")
    yield nodes
    await stop_all(nodes)


async def test_a_cold_encoder_is_loaded_with_its_kind(two: list[FakeNeuron]) -> None:
    """The first request loads the encoder (the load says kind "embedding") and is served."""
    async with gateway(two, catalogue(EMBED), load_wait_s=30.0) as client:
        resp = await client.post(EMBEDDINGS_PATH, json=embeddings())
        assert resp.status == 200, await resp.text()
    (load,) = two[0].load_requests + two[1].load_requests
    assert load["kind"] == "embedding" and load["model_id"] == "e1"


async def test_a_replicas_503_is_retried_on_another(two: list[FakeNeuron]) -> None:
    """Before the first byte, a replica's 503 costs the client nothing, as for chat."""
    two[0].add_model("e1")
    two[1].add_model("e1", in_flight=1)
    two[0].chat_error = (503, "model_loading")
    async with gateway(two, catalogue(EMBED)) as client:
        resp = await client.post(EMBEDDINGS_PATH, json=embeddings())
        assert resp.status == 200 and (await resp.json())["served_by"] == "n2"


async def test_kind_and_field_errors_are_400_before_any_routing(two: list[FakeNeuron]) -> None:
    """Wrong kind either way, or no `input`: 400 from cortex itself, no neuron asked."""
    chat_model = ModelSpec(id="m1", source="org/m1", memory_gb=1.0)
    async with gateway(two, catalogue(EMBED, chat_model)) as client:
        on_chat = await client.post(EMBEDDINGS_PATH, json=embeddings("m1"))
        on_encoder = await client.post(CHAT, json=chat("e1"))
        no_input = await client.post(EMBEDDINGS_PATH, json={"model": "e1"})
        unknown = await client.post(EMBEDDINGS_PATH, json=embeddings("nope"))
        answers = [(r.status, (await r.json())["error"]["param"]) for r in (on_chat, on_encoder)]
        assert answers == [(400, "model"), (400, "model")]
        assert no_input.status == 400 and (await no_input.json())["error"]["param"] == "input"
        assert unknown.status == 404
        metrics = await (await client.get("/metrics")).text()
    assert sum(n.calls["load"] + n.calls["chat"] for n in two) == 0
    assert 'api="embeddings"' in metrics
