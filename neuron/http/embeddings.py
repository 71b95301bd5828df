"""POST /v1/embeddings on the neuron: the request checked and tokenized, for the proxy.

The proxy serves it as it serves chat (admission, traces, metrics, the runner's
health record, the answer renamed to the id asked for); only the check differs.
Here every field is checked (neuron.runner.embed_request), strings are
tokenized with the model's own tokenizer (short ones on the event loop, longer
ones in the supervisor's tokenizing pool, as chat prompts are counted) and
each input's length is checked, so a bad request is a 400 naming its field
before any runner work; the runner gets token ids only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from neuron.runner.embed_request import EmbedLimits, parse, runner_body, token_ids
from neuron.runner.request_check import RUNNER_MODEL_NAME, Checked, ModelInfo
from shared.errors import InternalError

# Characters of text tokenized on the event loop (more go to the tokenizing pool).
INLINE_CHARS = 2048


async def check_embedding(
    body: dict[str, Any],
    info: ModelInfo,
    limits: EmbedLimits | None,
    pool: concurrent.futures.Executor,
) -> Checked:
    """The runner's body for `body` (a 400 naming the field if it is bad)."""
    if limits is None or info.tokenizer is None:
        # A ready embedding model has both (read before its runner started).
        raise InternalError("embedding model without its limits or tokenizer")
    req = parse(body, limits)
    if sum(len(t) for t in req.texts()) <= INLINE_CHARS:
        ids = token_ids(req, info.tokenizer, limits)
    else:
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(pool, token_ids, req, info.tokenizer, limits)
    return Checked(
        body=runner_body(RUNNER_MODEL_NAME, ids, req.encoding_format),
        stream=False,
        include_usage=False,
        # One JSON answer, whole: an encoder has nothing to stream.
        runner_stream=False,
        prompt_tokens=sum(len(t) for t in ids),
        max_tokens=0,
    )
