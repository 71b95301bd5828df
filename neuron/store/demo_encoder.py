"""`neuron demo-encoder`: a tiny random-weight BERT encoder the embedding runner loads.

The embedding twin of the demo model (neuron.store.demo_model): a Hugging Face
BERT checkpoint in shape (config.json, model.safetensors with transformers'
parameter names, a WordPiece tokenizer.json), random weights, so its vectors
have the right shape and are deterministic but mean nothing. Real embedding
weights are not reachable from here; this lets the whole embeddings path,
runner included, run and be tested on any CPU in seconds.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import attrs

from neuron.store.demo_model import _CORPUS, building

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
README_MARK = "Demo encoder for cortex + neuron"
# Hidden size of the default demo encoder: each embedding has this many numbers.
DEMO_DIMENSIONS = 32


@attrs.frozen
class EncoderShape:
    """The encoder's size; the default is the tiny demo encoder (about 48k parameters).

    `EncoderShape(384, 6, 12)` is all-MiniLM-L6-v2's shape (11M parameters with
    the demo vocabulary, 22M with its own): a CPU-bound encoder for bench/embeddings.py.
    """

    hidden_size: int = DEMO_DIMENSIONS
    layers: int = 2
    heads: int = 4

    def __attrs_post_init__(self) -> None:
        if self.heads < 1 or self.hidden_size < self.heads or self.hidden_size % self.heads:
            raise ValueError("hidden size must be a positive multiple of the head count")
        if self.layers < 1:
            raise ValueError("layers must be >= 1")


def encoder_config(vocab_size: int, shape: EncoderShape = EncoderShape()) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": 4 * shape.hidden_size,
        "hidden_act": "gelu",
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def demo_vocab(size: int) -> dict[str, int]:
    """A WordPiece vocabulary, fixed by construction (the `tokenizers` WordPiece trainer
    numbers its alphabet in hash order, so its files differ run to run): the special
    tokens, every ASCII letter, digit and punctuation mark alone and as a `##`
    continuation (so any ASCII text has a spelling), then the demo corpus's words."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    words = sorted({w for line in _CORPUS for w in re.findall(r"\w+", line.lower())})
    tokens = dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars), *words])
    return {t: i for i, t in enumerate(list(tokens)[:size])}


def _write_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(demo_vocab(vocab_size), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    # As BERT tokenizers do: [CLS] text [SEP] (the runner relies on the tokenizer for it).
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "BertTokenizerFast",
                "do_lower_case": True,
                "model_max_length": 512,
                **{f"{t[1:-1].lower()}_token": t for t in SPECIAL_TOKENS},
            },
            indent=2,
        )
    )
    return int(tok.get_vocab_size())


def is_demo_encoder(path: Path) -> bool:
    readme = path / "README.md"
    return readme.is_file() and readme.read_text(errors="replace").startswith(README_MARK)


def build_demo_encoder(
    path: Path, seed: int = 0, vocab_size: int = 512, shape: EncoderShape = EncoderShape()
) -> Path:
    """Write the demo encoder to `path` (replacing an earlier one atomically).

    Deterministic: the same seed gives byte-identical files. An existing
    non-empty `path` that is not a demo encoder is refused (NotADemoModel).
    """
    path = Path(path).resolve()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from neuron.runner.encoder import Encoder, EncoderConfig

    with building(path, is_demo_encoder, "demo encoder") as tmp:
        vocab = _write_tokenizer(tmp, vocab_size)
        config = encoder_config(vocab, shape)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.random.seed(seed)
        model = Encoder(EncoderConfig.from_json(config))
        flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[no-untyped-call, assignment]
        weights = {k: v.astype(mx.float32) for k, v in flat}
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        (tmp / "README.md").write_text(
            f"{README_MARK} (seed {seed}): random weights; vectors of the right shape that "
            "mean nothing.\n"
        )
    return path
