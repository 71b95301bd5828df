"""Structured output as its users ask for it: LangChain and `llm --schema`, on the real model.

Both send an OpenAI chat request cortex passes on unchanged; the runner enforces
the schema by constrained decoding (issue 18). LangChain's `json_schema` method
sends `response_format`, its `function_calling` method a forced tool call
(`tool_choice` naming the function): before, the first got a 400 and the second a
silent `None`. The answers are checked against the schema, not for a status code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import jsonschema
import pydantic
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI

from tests.clients.conftest import ASK_CITY, CITY_TOOL, REAL_MODEL, RealFleet

LLM = Path(sys.executable).parent / "llm"


class City(pydantic.BaseModel):
    """A city and the country it is in."""

    city: str
    country: str
    size: Literal["small", "large"]


def _chat(fleet: RealFleet) -> ChatOpenAI:
    return ChatOpenAI(
        model=REAL_MODEL,
        base_url=fleet.url + "/v1",
        api_key=pydantic.SecretStr("unused"),
        temperature=0,
        max_completion_tokens=48,
        max_retries=0,
        timeout=120,
    )


PROMPT = ASK_CITY


def test_langchain_structured_output_with_json_schema(real_fleet: RealFleet) -> None:
    """`with_structured_output(method="json_schema")`: a City, parsed by LangChain."""
    structured = _chat(real_fleet).with_structured_output(City, method="json_schema")
    got = structured.invoke(PROMPT)
    assert isinstance(got, City), got
    assert got.size in ("small", "large")


def test_langchain_structured_output_with_function_calling(real_fleet: RealFleet) -> None:
    """`with_structured_output(method="function_calling")` forces a tool call: a City,
    never the silent None an ignored tool_choice gave."""
    # The session's one tool, as the other tool tests send it (one prompt prefix).
    assert convert_to_openai_tool(City) == CITY_TOOL
    structured = _chat(real_fleet).with_structured_output(City, method="function_calling")
    got = structured.invoke(PROMPT)
    assert isinstance(got, City), got


def test_llm_cli_schema(real_fleet: RealFleet, tmp_path: Path) -> None:
    """`llm --schema 'city, country, population int'` against cortex: JSON that validates."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: cortex-smollm2\n"
        f"  model_name: {REAL_MODEL}\n"
        f"  api_base: {real_fleet.url}/v1\n"
        f"  supports_schema: true\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "unused"}
    done = subprocess.run(
        [
            str(LLM),
            "-m",
            "cortex-smollm2",
            "--schema",
            "city, country, population int",
            "-o",
            "temperature",
            "0",
            "-o",
            "max_tokens",
            "48",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "country": {"type": "string"},
            "population": {"type": "integer"},
        },
        "required": ["city", "country", "population"],
    }
    jsonschema.validate(answer, schema)
