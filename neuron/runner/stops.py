"""Which stop sequence ended an answer: the shim's patch of mlx_lm.server (see main.py).

mlx_lm.server says `finish_reason: "stop"` both when the model ends its turn (an
end-of-sequence token) and when a client's `stop` sequence matched, and strips
the sequence from the text: nothing in its answer tells them apart. Anthropic's
Messages API must (`stop_reason` "end_turn" or "stop_sequence", and which one),
so the answer's last choice carries the matched sequence as `stop_reason`, the
field vLLM uses for it (OpenAI clients ignore it).

mlx_lm matches stop sequences by tokens (each one encoded alone, as here), so
the sequence that matched is the one whose tokens end the generated ones. The
generator of a request's tokens is read in the request's handler thread, which
also writes its answer: a thread-local carries the match from one to the other.
Nothing here may fail a request: any surprise leaves the answer as mlx_lm made it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)

# The field of a chat choice that names the matched stop sequence (vLLM's).
FIELD = "stop_reason"

_last = threading.local()


def matched_stop(
    tokens: Sequence[int], eos: Collection[int], stops: Sequence[tuple[str, Sequence[int]]]
) -> str | None:
    """The stop sequence whose tokens end `tokens`; None if the last is end-of-sequence
    (the turn ended) or none matches. The longest wins (mlx_lm stops at the first
    match, which is the longest one ending there)."""
    if not tokens or tokens[-1] in eos:
        return None
    for word, seq in sorted(stops, key=lambda s: -len(s[1])):
        n = len(seq)
        if n and len(tokens) >= n and list(tokens[-n:]) == list(seq):
            return word
    return None


def _watched(
    response: Iterator[Any], eos: Collection[int], stops: list[tuple[str, list[int]]]
) -> Iterator[Any]:
    """The request's token stream, unchanged; the sequence that stopped it noted."""
    longest = max(len(seq) for _, seq in stops)
    tail: list[int] = []
    for gen in response:
        tail = [*tail[-longest:], gen.token]
        if gen.finish_reason == "stop":
            _last.stop = matched_stop(tail, eos, stops)
        yield gen


def install(server: Any) -> None:
    """Patch mlx_lm.server (the module): answers ended by a stop sequence name it."""
    base_generate = server.ResponseGenerator.generate

    def generate(self: Any, request: Any, args: Any, *rest: Any, **kw: Any) -> Any:
        _last.stop = None
        ctx, response = base_generate(self, request, args, *rest, **kw)
        words = [w for w in getattr(args, "stop_words", None) or () if isinstance(w, str) and w]
        if not words:
            return ctx, response
        try:
            tokenizer = self.model_provider.tokenizer
            eos = set(tokenizer.eos_token_ids)
            stops = [(w, list(tokenizer.encode(w, add_special_tokens=False))) for w in words]
        except Exception:  # never fail a request over this
            log.exception("cannot encode the stop sequences")
            return ctx, response
        return ctx, _watched(response, eos, stops)

    base_response = server.APIHandler.generate_response

    def generate_response(self: Any, text: str, finish_reason: Any, *rest: Any, **kw: Any) -> Any:
        answer = base_response(self, text, finish_reason, *rest, **kw)
        if finish_reason is not None:
            word, _last.stop = getattr(_last, "stop", None), None
            if word is not None and finish_reason == "stop":
                answer["choices"][0][FIELD] = word
        return answer

    server.ResponseGenerator.generate = generate
    server.APIHandler.generate_response = generate_response
