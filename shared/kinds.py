"""What kind of model a catalogue entry is, and which endpoints each kind serves.

A chat model (a decoder, run by `mlx_lm.server`) serves chat and completions,
and every API translated onto chat; an embedding model (an encoder, run by
`neuron.runner.embed_main`) serves POST /v1/embeddings only. Asking one for the
other's work is the request's fault, so it is a permanent 400 naming the model
and its kind, from cortex and from the neuron alike (never retried elsewhere).
"""

from __future__ import annotations

from typing import Literal

from shared.errors import InvalidRequest

ModelKind = Literal["chat", "embedding"]
KINDS: tuple[ModelKind, ...] = ("chat", "embedding")
EMBEDDINGS_PATH = "/v1/embeddings"


def path_kind(path: str) -> ModelKind:
    """The kind of model an inference path needs (every path but embeddings is chat's)."""
    return "embedding" if path == EMBEDDINGS_PATH else "chat"


def wrong_kind(model: str, kind: ModelKind, path: str) -> InvalidRequest | None:
    """The 400 for asking `model` (of `kind`) on `path`, or None when it serves it."""
    wanted = path_kind(path)
    if kind == wanted:
        return None
    if kind == "embedding":
        return InvalidRequest(
            # No path named: a translated API (Messages, Responses) reaches here as chat.
            f"model {model!r} is an embedding model (kind 'embedding'): it serves only "
            f"POST {EMBEDDINGS_PATH}",
            param="model",
        )
    return InvalidRequest(
        f"model {model!r} is a {kind} model (kind {kind!r}): POST {EMBEDDINGS_PATH} serves "
        "only models of kind 'embedding'",
        param="model",
    )


def parse_kind(value: object, param: str = "kind") -> ModelKind:
    """A kind from JSON; ValueError naming the allowed ones."""
    if value == "chat":
        return "chat"
    if value == "embedding":
        return "embedding"
    raise ValueError(f"{param} must be one of {', '.join(KINDS)}, not {value!r}"[:200])
