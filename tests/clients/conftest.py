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
