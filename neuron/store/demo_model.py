"""`neuron demo-model`: a tiny random-weight Llama that `mlx_lm.load` accepts.

It produces noise, not language. It exists so that the whole stack, real
`mlx_lm.server` runners included, runs and is tested on any CPU in seconds.
The shape (4 attention heads, 2 KV heads) lets it be tensor-sharded over 2 ranks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

SPECIAL_TOKENS = ("<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|pad|>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# A few lines of text to train the byte-level BPE on; any text would do.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fleet of small machines can serve a model none of them could hold alone.",
    "Hello, world! How are you today? I am a tiny language model made of noise.",
    "def main(): return 42  # numbers 0 1 2 3 4 5 6 7 8 9",
    "Thunderbolt links Mac Studios; Linux boxes carry GPUs; the gateway routes.",
    "Once upon a time there was a runner, a neuron and a cortex.",
]


@attrs.frozen
class Shape:
    """The model's size; the default is the tiny demo model (about 70k parameters).

    `neuron demo-model --hidden-size 768 --intermediate-size 3072 --layers 11`
    is about 100M: a CPU-bound model for benches (bench/neuron.py).
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2

    def __attrs_post_init__(self) -> None:
        if self.hidden_size < 4 or self.hidden_size % 4:
            raise ValueError("hidden size must be a positive multiple of 4 (4 heads)")
        if self.intermediate_size < 1 or self.layers < 1:
            raise ValueError("intermediate size and layers must be >= 1")


def demo_config(vocab_size: int, shape: Shape = Shape()) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": shape.hidden_size // 4,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }


def _train_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<|begin|>",
                "eos_token": "<|end|>",
                "pad_token": "<|pad|>",
                "model_max_length": 4096,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<|begin|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"})
    )
    return int(tok.get_vocab_size())


README_MARK = "Demo model for cortex + neuron"


class NotADemoModel(Exception):
    """The target exists and is something else: never delete an operator's files."""


def is_demo_model(path: Path) -> bool:
    readme = path / "README.md"
    return readme.is_file() and readme.read_text(errors="replace").startswith(README_MARK)


@contextlib.contextmanager
def building(path: Path, ours: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """A temp dir beside `path` to write a model into; on success it replaces `path`
    at once (an earlier build of ours), on failure it is removed. A non-empty `path`
    that `ours` does not recognise is refused: never delete an operator's files."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not ours(path):
        raise NotADemoModel(f"{path} exists and is not a {what}; pick another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_model(
    path: Path, seed: int = 0, vocab_size: int = 512, shape: Shape = Shape()
) -> Path:
    """Write the demo model to `path` (replacing an earlier demo model atomically).

    Deterministic: the same seed gives byte-identical weights and tokenizer.
    An existing non-empty `path` that is not a demo model is refused.
    """
    path = Path(path).resolve()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    with building(path, is_demo_model, "demo model") as tmp:
        vocab = _train_tokenizer(tmp, vocab_size)
        config = demo_config(vocab, shape)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        mx.random.seed(seed)
        model = llama.Model(llama.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
        # Default init is too tame for a 2-layer toy: scale it so greedy decoding
        # wanders instead of repeating one token forever.
        weights: dict[str, mx.array] = {}
        flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        for key, value in flat:
            weights[key] = (value if "norm" in key else value * 4.0).astype(mx.float32)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "README.md").write_text(
            f"{README_MARK} (seed {seed}): random weights, noise not language.\n"
        )
    return path
