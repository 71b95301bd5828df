"""POST /v1/embeddings, as data: the request checked, and the answer built.

Pure functions shared by the neuron (which checks a request before any runner
work, tokenizes it and sends the runner token ids) and the embedding runner
(which checks again what it is sent, as any server must). A bad field is
`InvalidRequest` naming it, as for chat.

`input` is a string, an array of strings, an array of token ids, or an array
of arrays of token ids (OpenAI's four forms). Strings get the tokenizer's
special tokens ([CLS] ... [SEP] for BERT); token ids are taken as they are, so
a client that tokenizes with tiktoken (LangChain's OpenAIEmbeddings does unless
`check_embedding_ctx_length=False`) sends ids of another vocabulary: they are
refused only when out of range.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from shared.errors import InvalidRequest

Format = Literal["float", "base64"]
Input = str | tuple[int, ...]
# OpenAI's own bound on inputs per request.
MAX_INPUTS = 2048
# A string over `max_tokens * BYTES_PER_TOKEN` characters cannot fit: refused untokenized.
BYTES_PER_TOKEN = 16


@attrs.frozen
class EmbedLimits:
    """What a request to one embedding model may ask: from the model's config.json."""

    dimensions: int
    vocab_size: int
    # Tokens per input, special tokens included.
    max_tokens: int

    @classmethod
    def from_config(cls, config: dict[str, Any], context_limit: int | None = None) -> EmbedLimits:
        """From config.json's fields (ValueError if it lacks them); `context_limit`
        (the catalogue's) may only lower the model's own limit."""
        try:
            # RoBERTa numbers positions from pad_token_id + 1 (as neuron.runner.encoder).
            pad = int(config.get("pad_token_id") or 0)
            offset = 0 if config.get("model_type") == "bert" else pad + 1
            dims = int(config["hidden_size"])
            vocab = int(config["vocab_size"])
            positions = int(config["max_position_embeddings"]) - offset
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks a usable {exc}") from exc
        limit = positions if context_limit is None else min(positions, context_limit)
        return cls(dimensions=dims, vocab_size=vocab, max_tokens=max(1, limit))

    @classmethod
    def load(cls, model_dir: Path, context_limit: int | None = None) -> EmbedLimits:
        """Read `model_dir`/config.json (blocking)."""
        raw = json.loads((model_dir / "config.json").read_text())
        if not isinstance(raw, dict):
            raise ValueError("config.json is not an object")
        return cls.from_config(raw, context_limit)


@attrs.frozen
class EmbedRequest:
    """A checked request: its inputs in order, and how the vectors are wanted."""

    inputs: tuple[Input, ...]
    encoding_format: Format = "float"

    def texts(self) -> list[str]:
        return [i for i in self.inputs if isinstance(i, str)]


def _bad(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"`{param}` {what}", param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: str, where: str, limits: EmbedLimits) -> str:
    if not v:
        raise _bad("input", f"{where}must not be an empty string")
    if len(v) > limits.max_tokens * BYTES_PER_TOKEN:
        raise _bad("input", f"{where}is far over the model's {limits.max_tokens} tokens per input")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad("input", f"{where}is not valid Unicode ({exc.reason})") from exc
    return v


def _tokens(v: list[Any], where: str, limits: EmbedLimits) -> tuple[int, ...]:
    if not v:
        raise _bad("input", f"{where}must not be an empty array of tokens")
    if not all(_is_int(t) and 0 <= t < limits.vocab_size for t in v):
        raise _bad("input", f"{where}token ids must be integers in [0, {limits.vocab_size - 1}]")
    check_length(len(v), where, limits)
    return tuple(v)


def check_length(tokens: int, where: str, limits: EmbedLimits) -> None:
    if tokens > limits.max_tokens:
        raise _bad(
            "input", f"{where}has {tokens} tokens; the model takes at most {limits.max_tokens}"
        )


def _inputs(v: Any, limits: EmbedLimits) -> tuple[Input, ...]:
    """OpenAI's four shapes of `input`, each item checked."""
    if isinstance(v, str):
        return (_text(v, "", limits),)
    if not isinstance(v, list) or not v:
        raise _bad("input", "must be a string, or a non-empty array of strings or of tokens")
    if all(_is_int(t) for t in v):
        return (_tokens(v, "", limits),)
    if len(v) > MAX_INPUTS:
        raise _bad("input", f"must hold at most {MAX_INPUTS} inputs, not {len(v)}")
    out: list[Input] = []
    for i, item in enumerate(v):
        if isinstance(item, str):
            out.append(_text(item, f"[{i}] ", limits))
        elif isinstance(item, list):
            out.append(_tokens(item, f"[{i}] ", limits))
        else:
            raise _bad("input", f"[{i}] must be a string or an array of token ids")
    return tuple(out)


def parse(body: dict[str, Any], limits: EmbedLimits) -> EmbedRequest:
    """The checked request; unknown fields are dropped (clients send extras)."""
    if "input" not in body:
        raise _bad("input", "is required (a string or an array)")
    inputs = _inputs(body["input"], limits)
    fmt: Format
    match body.get("encoding_format"):
        case None | "float":
            fmt = "float"
        case "base64":
            fmt = "base64"
        case _:
            raise _bad("encoding_format", "must be 'float' or 'base64'")
    dims = body.get("dimensions")
    # An encoder has one size; truncating it would need a model trained for that.
    if dims is not None and (not _is_int(dims) or dims != limits.dimensions):
        raise _bad("dimensions", f"must be {limits.dimensions} (this model's only size) or absent")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string")
    return EmbedRequest(inputs=inputs, encoding_format=fmt)


def token_ids(req: EmbedRequest, tokenizer: Any, limits: EmbedLimits) -> list[tuple[int, ...]]:
    """Every input as token ids, strings tokenized by `tokenizer` (a `tokenizers.Tokenizer`,
    its special tokens added), each within the model's tokens per input; blocking."""
    texts = req.texts()
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    ids = [tuple(next(encoded).ids) if isinstance(i, str) else i for i in req.inputs]
    for n, one in enumerate(ids):
        check_length(len(one), f"[{n}] " if len(ids) > 1 else "", limits)
    return ids


def runner_body(model: str, ids: Sequence[Sequence[int]], fmt: Format) -> dict[str, Any]:
    """What the neuron sends its runner: every input as token ids."""
    return {"model": model, "input": [list(t) for t in ids], "encoding_format": fmt}


def answer(model: str, vectors: Sequence[list[float] | str], prompt_tokens: int) -> dict[str, Any]:
    """The OpenAI answer body for vectors already encoded (floats, or base64 of
    little-endian float32), in input order."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
