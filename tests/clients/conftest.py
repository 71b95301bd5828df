"""Client-compatibility tests: third-party clients against a real cortex.

LiteLLM fetches its model cost map (and a few other configs) from GitHub at
import unless told otherwise, and reads a `.env` in DEV mode; none of that may
happen here. This conftest is imported before any test module in this folder,
so the environment is set before `litellm` is first imported (only by
test_litellm.py, which also switches its callbacks off).
"""

from __future__ import annotations

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ["LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS"] = "True"
os.environ["LITELLM_LOCAL_BLOG_POSTS"] = "True"
os.environ["LITELLM_MODE"] = "PRODUCTION"  # no dotenv loading
os.environ["LITELLM_TELEMETRY"] = "False"


# -- one real fleet for every client test of this session ------------------------------

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.conftest import TEST_ROOT, NeuronProcess, stop_quietly
from tests.e2e.conftest import CortexProcess

REAL_MODEL = "smollm2-135m"


@attrs.frozen
class RealFleet:
    """One neuron serving the real model (kept loaded) and the demo model, and a cortex."""

    neuron: NeuronProcess
    cortex: CortexProcess

    @property
    def url(self) -> str:
        return self.cortex.url


@pytest.fixture(scope="session")
def real_fleet(
    tmp_path_factory: pytest.TempPathFactory, real_model: Path, demo_model: Path
) -> Iterator[RealFleet]:
    """Shared by the client tests (SDKs, agents, LiteLLM): the real model answers with
    meaning, the demo model where only shapes matter. Started once: the real model
    takes seconds to load and this CPU decodes ~8 tokens/s."""
    root = tmp_path_factory.mktemp("real-fleet")
    roots = [*map(str, TEST_ROOT), str(real_model.parent), str(demo_model.parent)]
    neuron = NeuronProcess.start(root / "neuron", {"model_roots": roots})
    cortex = CortexProcess.write(
        root / "cortex",
        [("a", neuron)],
        [
            {"id": REAL_MODEL, "source": str(real_model), "keep_loaded": True},
            {"id": "demo", "source": str(demo_model)},
        ],
    )
    try:
        cortex.start()
        neuron.wait_state(REAL_MODEL, "ready")
        yield RealFleet(neuron=neuron, cortex=cortex)
    finally:
        cortex.stop()
        stop_quietly(neuron)


# One tool for the real-model tool tests, as LangChain sends its `City` model: the same
# JSON makes the same prompt prefix in every API, so the runner's prompt cache prefills
# it once per session (this CPU prefills ~10 tokens/s; a cold tool prompt costs 15-20 s).
CITY_DESCRIPTION = "A city and the country it is in."
CITY_PARAMETERS: dict[str, Any] = {
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "size": {"enum": ["small", "large"], "type": "string"},
    },
    "required": ["city", "country", "size"],
    "type": "object",
}
CITY_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "City", "description": CITY_DESCRIPTION, "parameters": CITY_PARAMETERS},
}
ASK_CITY = "Name the capital of France, its country, and whether it is small or large."
