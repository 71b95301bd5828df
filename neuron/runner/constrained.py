"""Constrained decoding inside the runner: the shim's patch of mlx_lm.server (see main.py).

A request whose body carries `neuron_constraint` (neuron.runner.grammar) is
checked in its HTTP handler thread, before it reaches the generation thread:
the grammar is built with this model's tool-call markers and compiled with its
tokenizer; what cannot be honoured (a forced tool call on a model without a
tool-call format the grammar can write) is a 400 naming the field, never a
plain answer.  The grammar text then rides on the request's GenerationArguments
(pickled as they are to every rank of a group, so each rank builds the same
mask from the same tokens and all sample alike), and `_make_logits_processors`,
which mlx_lm calls per request on both its batched and its sequential path,
appends a `GrammarMask`.

The mask sets every token that would break the grammar to -inf; the model's
end-of-sequence tokens are allowed only where the grammar may end, and once it
must end they are all that is left, so the answer stops there.  Nothing here
may raise in the generation thread (its death breaks the runner): a matcher in
an error state lets only end-of-sequence through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

import attrs
import numpy as np

from neuron.runner.grammar import WIRE_FIELD, Constraint, GrammarError, lark

log = logging.getLogger(__name__)

# mlx_lm's tool parser whose format our grammar writes: <tool_call>{json}</tool_call>.
JSON_TOOLS_PARSER = "mlx_lm.tool_parsers.json_tools"


class Refusal(Exception):
    """A request the runner cannot honour: a 400 naming `param`."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def tool_markers(tokenizer: Any) -> tuple[str, str] | None:
    """The model's tool-call start and end, if its format is the one the grammar writes."""
    if not getattr(tokenizer, "has_tool_calling", False):
        return None
    parser = getattr(tokenizer, "tool_parser", None)
    if getattr(parser, "__module__", None) != JSON_TOOLS_PARSER:
        return None
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    return (start, end) if isinstance(start, str) and isinstance(end, str) else None


def build_lltokenizer(tokenizer: Any) -> Any:
    """llguidance's view of an mlx_lm TokenizerWrapper (about 0.4 s for a 49k vocabulary)."""
    import copy

    import llguidance

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise Refusal(
            "constrained decoding needs a model with a fast (tokenizers) tokenizer",
            "response_format",
        )
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    eos = sorted(int(t) for t in tokenizer.eos_token_ids)
    return llguidance.LLTokenizer(backend.to_str(), eos_token=eos)


@attrs.define(eq=False)
class GrammarMask:
    """A logits processor: `(tokens, logits) -> logits` with the grammar's bad tokens at -inf.

    mlx_lm calls it once per generated token: the first call with the prompt,
    every later one with the token sampled last at the end of `tokens`.
    """

    matcher: Any  # llguidance.LLMatcher; None: no grammar could be built, end at once
    eos: np.ndarray  # the model's end-of-sequence ids
    bitmask: np.ndarray  # one bit per token, filled by llguidance
    started: bool = False
    failed: bool = False

    @classmethod
    def create(cls, lltokenizer: Any, grammar: str) -> GrammarMask:
        import llguidance

        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        words = (lltokenizer.vocab_size + 31) // 32
        eos = np.array(sorted(set(lltokenizer.eos_tokens)), dtype=np.int64)
        return cls(matcher, eos, np.zeros((1, words), dtype=np.int32))

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        # The forward pass runs while the mask is computed on this thread.
        mx.async_eval(logits)  # type: ignore[no-untyped-call]
        if self.started and self.matcher is not None:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.started = True
        allowed = self.allowed(logits.shape[-1])
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))

    def allowed(self, width: int) -> np.ndarray:
        """One bool per logit: may this token come next?"""
        ok = self.matcher is not None and not self.matcher.is_error()
        if ok:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            bits = np.unpackbits(self.bitmask.view(np.uint8), count=width, bitorder="little")
            mask = bits.astype(bool)
            ok = bool(mask.any())
        if not ok:
            # Never a row of -inf (NaN after softmax): end the answer instead.
            if not self.failed:
                why = "no grammar" if self.matcher is None else self.matcher.get_error()
                log.warning("constrained decoding failed (%s); ending the answer", why)
                self.failed = True
            mask = np.zeros(width, dtype=bool)
            mask[self.eos[self.eos < width]] = True
        return mask


@attrs.define(eq=False)
class Grammars:
    """One runner's grammar state: llguidance's tokenizer, built once per loaded tokenizer."""

    provider: Any = None  # mlx_lm.server.ModelProvider
    lock: threading.Lock = attrs.Factory(threading.Lock)
    cache: tuple[Any, Any] | None = None  # (the mlx_lm tokenizer, its LLTokenizer)

    def lltokenizer(self, tokenizer: Any) -> Any:
        with self.lock:
            if self.cache is None or self.cache[0] is not tokenizer:
                self.cache = (tokenizer, build_lltokenizer(tokenizer))
            return self.cache[1]

    def prepare(self, body: Any) -> str | None:
        """The grammar for this request body (None: unconstrained); Refusal if it cannot be.

        Runs in the request's handler thread: everything that can fail fails here.
        """
        raw = body.get(WIRE_FIELD) if isinstance(body, dict) else None
        if raw is None:
            return None
        try:
            constraint = Constraint.from_wire(raw)
        except ValueError as exc:
            raise Refusal(str(exc), WIRE_FIELD) from exc
        tokenizer = None if self.provider is None else self.provider.tokenizer
        if tokenizer is None:
            raise Refusal("the model is not loaded yet", WIRE_FIELD, status=503)
        try:
            grammar = lark(constraint, tool_markers(tokenizer))
        except GrammarError as exc:
            raise Refusal(exc.message, exc.param) from exc
        import llguidance

        problem = llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_lark(grammar), self.lltokenizer(tokenizer)
        )
        if problem:
            param = "tool_choice" if constraint.tool_required else "response_format"
            raise Refusal(f"the constraint cannot be compiled: {problem}", param)
        return grammar

    def processor(self, grammar: str) -> GrammarMask:
        """The mask for one generation (in the generation thread: it never raises).

        The grammar compiled in the handler thread, so this cannot fail but by a
        bug; then the answer ends at once rather than come out unconstrained.
        """
        eos = np.array(sorted(self.provider.tokenizer.eos_token_ids), dtype=np.int64)
        try:
            return GrammarMask.create(self.lltokenizer(self.provider.tokenizer), grammar)
        except Exception:  # a bug here must not kill the generation thread
            log.exception("cannot build the grammar mask")
            return GrammarMask(None, eos, np.zeros((1, 1), dtype=np.int32))


def _refuse(handler: Any, exc: Refusal) -> None:
    """Answer a refusal as mlx_lm answers errors, with the OpenAI envelope and its param."""
    kind = "invalid_request_error" if exc.status == 400 else "server_error"
    body = {"error": {"message": exc.message, "type": kind, "param": exc.param}}
    handler._set_completion_headers(exc.status)
    handler.end_headers()
    with contextlib.suppress(OSError):
        handler.wfile.write(json.dumps(body).encode())
        handler.wfile.flush()


def install(server: Any) -> Grammars:
    """Patch mlx_lm.server (the module) to enforce `neuron_constraint`; returns the state."""
    grammars = Grammars()

    base_init = server.ResponseGenerator.__init__

    def init(self: Any, model_provider: Any, *args: Any, **kwargs: Any) -> None:
        # Every rank has one; the generation thread reads the tokenizer from it.
        grammars.provider = model_provider
        base_init(self, model_provider, *args, **kwargs)

    base_handle = server.APIHandler.handle_completion

    def handle_completion(self: Any, request: Any, stop_words: Any) -> None:
        try:
            request.neuron_grammar = grammars.prepare(self.body)
        except Refusal as exc:
            _refuse(self, exc)
            return
        base_handle(self, request, stop_words)

    base_generate = server.ResponseGenerator.generate

    def generate(self: Any, request: Any, generation_args: Any, *args: Any, **kw: Any) -> Any:
        # The arguments travel to the generation thread (and to other ranks): the grammar with them.
        generation_args.neuron_grammar = getattr(request, "neuron_grammar", None)
        return base_generate(self, request, generation_args, *args, **kw)

    base_make = server._make_logits_processors

    def make_logits_processors(args: Any) -> list[Any]:
        processors = list(base_make(args))
        grammar = getattr(args, "neuron_grammar", None)
        # Last: no bias or penalty after it can lift a masked token off -inf.
        return [*processors, grammars.processor(grammar)] if grammar else processors

    server.ResponseGenerator.__init__ = init
    server.APIHandler.handle_completion = handle_completion
    server.ResponseGenerator.generate = generate
    server._make_logits_processors = make_logits_processors
    return grammars
