"""GET /v1/models/{id} on cortex, as `client.models.retrieve` reads it (fake neurons)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import openai
import pytest

from tests.cortex.fakes import FakeNeuron, fleet, gateway, stop_all


@pytest.fixture
async def nodes() -> AsyncIterator[list[FakeNeuron]]:
    ns = await fleet("n1")
    yield ns
    await stop_all(ns)


async def test_retrieve_by_id_alias_and_uncatalogued(nodes: list[FakeNeuron]) -> None:
    """Catalogued (by id or alias) and served-but-uncatalogued models; others 404."""
    nodes[0].add_model("adhoc")
    before = int(time.time())
    async with gateway(nodes) as client:
        base = str(client.make_url("/v1"))
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as sdk:
            m1 = await sdk.models.retrieve("m1")
            assert m1.id == "m1" and m1.owned_by == "cortex"
            assert before - 1 <= m1.created <= int(time.time())  # catalogued at start
            assert (await sdk.models.retrieve("one")).id == "m1"  # an alias
            adhoc = await sdk.models.retrieve("adhoc")
            assert adhoc.owned_by == "neuron" and before - 1 <= adhoc.created
            # The list says the same as each retrieve.
            listed = {m.id: m.created for m in (await sdk.models.list()).data}
            assert listed == {"m1": m1.created, "m2": m1.created, "adhoc": adhoc.created}
            with pytest.raises(openai.NotFoundError) as exc:
                await sdk.models.retrieve("nope")
            assert exc.value.code == "model_not_found" and "nope" in exc.value.message
