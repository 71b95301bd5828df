"""A BERT-family text encoder in MLX, with pooling: what the embedding runner computes.

Written here rather than taken from mlx-embeddings: that package imports
mlx-vlm at load, which brings opencv, datasets, mlx-audio, fastapi and
transformers into every neuron, for one small forward pass. This module reads
a Hugging Face checkpoint as it is shipped (config.json with model_type `bert`,
`roberta` or `xlm-roberta`, safetensors with the transformers parameter names,
tokenizer.json), so sentence-transformers models (all-MiniLM, bge, e5, gte)
load unchanged, as does the local demo encoder (neuron.store.demo_encoder).

Pooling is the mean of the last hidden states over the real tokens (padding
masked out), then L2 normalisation, unless the checkpoint's
sentence-transformers pooling config (`1_Pooling/config.json`) asks for the
[CLS] token (bge does). Vectors are always unit length, as OpenAI's are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import mlx.core as mx

# From the defining modules: mlx.nn re-exports them by star imports, which mypy
# does not follow for a typed package.
from mlx.nn.layers.activations import gelu, gelu_approx, relu
from mlx.nn.layers.base import Module
from mlx.nn.layers.embedding import Embedding
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.normalization import LayerNorm

Pooling = Literal["mean", "cls"]
# Parameters a checkpoint may carry that the embedding path never uses.
_UNUSED = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
# Prefixes of the encoder's own parameters in *ForMaskedLM-style checkpoints.
_PREFIXES = ("bert.", "roberta.", "model.")
_ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": gelu_approx,
    "gelu_pytorch_tanh": gelu_approx,
    "relu": relu,
}


class EncoderError(Exception):
    """A model directory the encoder cannot load; the message says what is wrong."""


@attrs.frozen
class EncoderConfig:
    """The shape of a BERT-family encoder, from its config.json."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # RoBERTa numbers positions from pad_token_id + 1: that many are never used.
    position_offset: int = 0

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EncoderConfig:
        model_type = d.get("model_type")
        if model_type not in ("bert", "roberta", "xlm-roberta"):
            raise EncoderError(
                f"model_type {model_type!r} is not an encoder this runner knows "
                "(bert, roberta, xlm-roberta)"
            )
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise EncoderError(f"hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
        try:
            pad = int(d.get("pad_token_id") or 0)
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=int(d["num_attention_heads"]),
                intermediate_size=int(d["intermediate_size"]),
                max_position_embeddings=int(d["max_position_embeddings"]),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                pad_token_id=pad,
                position_offset=0 if model_type == "bert" else pad + 1,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EncoderError(f"config.json lacks a usable {exc}") from exc

    @property
    def max_tokens(self) -> int:
        """The longest input, special tokens included."""
        return self.max_position_embeddings - self.position_offset


class _Embeddings(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.offset = c.position_offset

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1]) + self.offset
        x = self.word_embeddings(ids) + self.position_embeddings(positions)[None]
        x = x + self.token_type_embeddings(mx.zeros_like(ids))
        return self.LayerNorm(x)  # type: ignore[no-any-return]


class _SelfAttention(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.query = Linear(c.hidden_size, c.hidden_size)
        self.key = Linear(c.hidden_size, c.hidden_size)
        self.value = Linear(c.hidden_size, c.hidden_size)
        self.heads = c.num_attention_heads

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, n, d = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scale = 1.0 / math.sqrt(d // self.heads)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class _Residual(Module):
    """dense, then LayerNorm over the residual sum (BERT's `*Output` blocks)."""

    def __init__(self, c: EncoderConfig, inputs: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dense = Linear(inputs, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)  # type: ignore[no-any-return]


class _Attention(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # Named as transformers names them, so checkpoints load without renaming.
        self.self = _SelfAttention(c)
        self.output = _Residual(c, c.hidden_size)


class _Intermediate(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.dense = Linear(c.hidden_size, c.intermediate_size)


class _Layer(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Residual(c, c.intermediate_size)
        self.act = _ACTIVATIONS[c.hidden_act]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        h = self.attention.output(self.attention.self(x, mask), x)
        return self.output(self.act(self.intermediate.dense(h)), h)


class _Encoder(Module):
    def __init__(self, c: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.layer = [_Layer(c) for _ in range(c.num_hidden_layers)]


class Encoder(Module):
    """Token ids and their mask in, the last hidden states out."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        # Additive: padded keys get a large negative score (not -inf: a row that is
        # all padding must not turn into NaNs).
        bias = ((1.0 - mask.astype(mx.float32)) * -1e9)[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, bias.astype(x.dtype))
        return x


def pool(hidden: mx.array, mask: mx.array, how: Pooling) -> mx.array:
    """One unit-length vector per row: the masked mean (or [CLS]) of `hidden`."""
    if how == "cls":
        v = hidden[:, 0, :].astype(mx.float32)
    else:
        m = mask.astype(mx.float32)[:, :, None]
        v = (hidden.astype(mx.float32) * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0)
    norm = mx.sqrt((v * v).sum(axis=-1, keepdims=True))
    return v / mx.maximum(norm, 1e-12)


def pooling_of(model_dir: Path) -> Pooling:
    """sentence-transformers' pooling choice for the checkpoint; mean when it has none."""
    path = model_dir / "1_Pooling" / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return "mean"
    if (
        isinstance(cfg, dict)
        and cfg.get("pooling_mode_cls_token")
        and not cfg.get("pooling_mode_mean_tokens")
    ):
        return "cls"
    return "mean"


def load_encoder(model_dir: Path) -> Encoder:
    """The encoder of `model_dir` with its weights (blocking)."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EncoderError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    if not isinstance(raw, dict):
        raise EncoderError("config.json is not an object")
    model = Encoder(EncoderConfig.from_json(raw))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise EncoderError(f"no *.safetensors in {model_dir}")
    weights: dict[str, mx.array] = {}
    for f in files:
        loaded: dict[str, mx.array] = mx.load(str(f))  # type: ignore[assignment]
        weights.update(loaded)
    try:
        model.load_weights(list(encoder_weights(weights).items()), strict=True)
    except ValueError as exc:
        raise EncoderError(f"weights do not fit the config: {exc}") from exc
    model.eval()
    mx.eval(model.parameters())  # type: ignore[no-untyped-call]
    return model


def encoder_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """A checkpoint's parameters under the encoder's names: prefixes and heads dropped."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        if key.startswith(_UNUSED):
            continue
        # Old TensorFlow-converted BERTs name LayerNorm's parameters gamma and beta.
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
        out[key] = value
    return out


def embed(model: Encoder, batch: Sequence[Sequence[int]], how: Pooling) -> mx.array:
    """Unit vectors (rows x hidden) for token sequences of any lengths (padded here)."""
    width = max(len(ids) for ids in batch)
    pad = model.config.pad_token_id
    ids = mx.array([list(t) + [pad] * (width - len(t)) for t in batch], dtype=mx.int32)
    mask = mx.array([[1] * len(t) + [0] * (width - len(t)) for t in batch], dtype=mx.int32)
    out = pool(model(ids, mask), mask, how)
    mx.eval(out)
    return out
