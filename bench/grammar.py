"""The grammar libraries for constrained decoding, measured on the real model's tokenizer.

`python -m bench.grammar [--rounds 20] [--pairs 6] [--no-decode]`

llguidance, xgrammar and outlines-core each get the real model's tokenizer
(SmolLM2-135M, 49152 tokens; `neuron real-model`) and the bench schema (nested
objects, enums, integers: BENCH_SCHEMA, the one bench/structured.py decodes
against). For each: the import, the tokenizer setup (once per model), the
compile (schema to the first token mask, as a request pays it without a
cache), and the mask per token (advance by the token, compute the next mask)
along a valid answer, over `--rounds` fresh matchers; then whether it takes
`json_object` (any JSON object), and the install size it adds to the neuron.
Then the model's decode step (mlx_lm, unconstrained) and, with the neuron's own
processor (neuron.runner.constrained.GrammarMask, llguidance), the same decode
constrained: what a token costs with the mask, as a ratio.

Only llguidance is a dependency (the neuron's); xgrammar and outlines-core are
measured when installed (`pip install xgrammar outlines-core`; xgrammar brings torch).
A run of all three with the decode replaces the bench-grammar section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs

from bench import benchmarks_md
from neuron.runner.grammar import JSON_STYLE

BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "country": {"type": "string", "enum": ["France", "Germany", "Japan", "Canada"]},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "country", "zip"],
            "additionalProperties": False,
        },
        "manager": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "level": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["name", "level"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address", "manager"],
    "additionalProperties": False,
}
# A valid answer, written as the grammar writes JSON (compact, ", " and ": ").
BENCH_EXAMPLE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "address": {"city": "London", "country": "Canada", "zip": 12345},
    "manager": {"name": "Charles Babbage", "level": 3},
}
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
# What the neuron installs anyway (pyproject's `neuron` extra): not counted as added.
NEURON_DISTS = ("mlx-lm", "mlx", "tokenizers", "numpy")


@attrs.frozen
class Result:
    name: str
    version: str
    import_s: float
    tokenizer_s: float
    compile_ms: float
    token_us: list[float]  # one per token, over all rounds
    json_object: str  # does `{"type": "object"}` take DEEP_OBJECT, and the compile time
    added_mb: float

    @property
    def mean_us(self) -> float:
        return statistics.fmean(self.token_us)

    def pct(self, q: float) -> float:
        ordered = sorted(self.token_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- one library at a time ----------------------------------------------------------


# `json_object` must take any object: this one nests four deep.
DEEP_OBJECT = {"a": {"b": {"c": {"d": [1, {"e": None}]}}}}

Stepper = Callable[[int | None], None]  # advance by a token (None: the first mask only)


@attrs.define
class Session:
    """A library set up for one tokenizer: `start(schema)` gives a stepper."""

    start: Callable[[Any], Stepper]


def _llguidance(hf: Any, eos: list[int]) -> Session:
    import llguidance
    import numpy as np

    from neuron.runner.constrained import build_lltokenizer

    class Wrapped:  # what build_lltokenizer reads off mlx_lm's TokenizerWrapper
        backend_tokenizer = hf.backend_tokenizer
        eos_token_ids = eos

    tok = build_lltokenizer(Wrapped())
    words = (tok.vocab_size + 31) // 32
    mask = np.zeros(words, dtype=np.int32)

    def start(schema: Any) -> Callable[[int | None], None]:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        m = llguidance.LLMatcher(tok, grammar, log_level=0)

        def step(token: int | None) -> None:
            if token is not None and not m.consume_token(token):
                raise RuntimeError(f"llguidance refused token {token}: {m.get_error()}")
            m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

        return step

    return Session(start)


def _xgrammar(hf: Any, eos: list[int]) -> Session:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def start(schema: Any) -> Callable[[int | None], None]:
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )
        m = xgr.GrammarMatcher(compiled)

        def step(token: int | None) -> None:
            if token is not None and not m.accept_token(token):
                raise RuntimeError(f"xgrammar refused token {token}")
            m.fill_next_token_bitmask(mask)

        return step

    return Session(start)


def _gpt2_bytes() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), reversed."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _outlines(hf: Any, eos: list[int]) -> Session:
    import numpy as np
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = _gpt2_bytes()
    specials = set(hf.all_special_ids)
    vocab: dict[bytes, list[int]] = {}
    for text, i in hf.get_vocab().items():
        if i in specials:
            continue
        raw = bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else text.encode()
        vocab.setdefault(raw, []).append(i)
    vocabulary = oc.Vocabulary(eos[0], vocab)
    mask = np.zeros(((len(hf) + 31) // 32,), dtype=np.int32)

    def start(schema: Any) -> Callable[[int | None], None]:
        guide = oc.Guide(oc.Index(build_regex_from_schema(json.dumps(schema), r" ?"), vocabulary))

        def step(token: int | None) -> None:
            if token is not None:
                guide.advance(token, return_tokens=False)
            guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)

        return step

    return Session(start)


SETUPS: dict[str, Callable[[Any, list[int]], Session]] = {
    "llguidance": _llguidance,
    "xgrammar": _xgrammar,
    "outlines-core": _outlines,
}
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


def import_seconds(module: str) -> float:
    """A cold import in a fresh interpreter (xgrammar's brings torch)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _requires(dist: str) -> set[str]:
    """The distributions `dist` needs, transitively (extras and foreign markers left out)."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = re.split(r"[ ;<>=!\[~(]", todo.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in requires:
            marker = req.split(";", 1)[1] if ";" in req else ""
            if "extra ==" in marker or ("platform_system" in marker and "Linux" not in marker):
                continue
            todo.append(req)
    return seen


def _size_mb(dists: Iterable[str]) -> float:
    total = 0
    for d in dists:
        for f in md.distribution(d).files or ():
            path = Path(str(f.locate()))
            if path.is_file():
                total += path.stat().st_size
    return total / 1e6


def added_mb(dist: str) -> float:
    """What installing `dist` adds next to the neuron's own dependencies."""
    have: set[str] = set()
    for d in NEURON_DISTS:
        have |= _requires(d)
    return _size_mb(_requires(dist) - have)


def json_object(session: Session, tokens: list[int]) -> str:
    """Whether a grammar for any JSON object takes one nested four deep (and its compile)."""
    t0 = time.perf_counter()
    try:
        step = session.start({"type": "object"})
        step(None)
    except Exception as exc:  # any library's refusal is the answer
        return f"no ({type(exc).__name__})"
    compile_ms = (time.perf_counter() - t0) * 1e3
    try:
        for token in tokens:
            step(token)
    except Exception:
        return f"not 4 deep ({compile_ms:.0f} ms)"
    return f"yes ({compile_ms:.0f} ms)"


def measure(name: str, hf: Any, eos: list[int], tokens: list[int], rounds: int) -> Result:
    t0 = time.perf_counter()
    session = SETUPS[name](hf, eos)
    tokenizer_s = time.perf_counter() - t0
    compiles, per_token = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step = session.start(BENCH_SCHEMA)
        step(None)
        compiles.append(time.perf_counter() - t0)
        for token in tokens:
            t0 = time.perf_counter()
            step(token)
            per_token.append((time.perf_counter() - t0) * 1e6)
    return Result(
        name=name,
        version=md.version(name),
        import_s=import_seconds(MODULES[name]),
        tokenizer_s=tokenizer_s,
        compile_ms=statistics.median(compiles) * 1e3,
        token_us=per_token,
        json_object=json_object(
            session, hf.encode(json.dumps(DEEP_OBJECT), add_special_tokens=False)
        ),
        added_mb=added_mb(name),
    )


# --- the model's decode step, with and without the neuron's mask ---------------------


@attrs.frozen
class Decode:
    """Per decoded token on the real model: wall ms and process CPU ms, plain and masked."""

    plain_ms: float
    masked_ms: float
    plain_cpu_ms: float
    masked_cpu_ms: float
    pairs: int
    apply_us: float  # numpy bits to an mlx mask over the logits, per token


def decode_steps(model_dir: Path, pairs: int) -> Decode:
    """Alternating plain and masked runs of 48 tokens; medians (the host is shared)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from neuron.runner.constrained import GrammarMask, build_lltokenizer
    from neuron.runner.grammar import Constraint, lark

    model, tok = load(str(model_dir))[:2]
    lltok = build_lltokenizer(tok)
    grammar = lark(Constraint(schema=BENCH_SCHEMA), None)
    prompt = tok.apply_chat_template(  # type: ignore[no-untyped-call]
        [{"role": "user", "content": "Describe an employee as JSON."}],
        add_generation_prompt=True,
    )
    sampler = make_sampler(0.7)

    def run(masked: bool) -> tuple[float, float]:
        procs = [GrammarMask.create(lltok, grammar)] if masked else None
        wall, cpu = [], []
        for _ in stream_generate(
            model, tok, prompt, max_tokens=48, sampler=sampler, logits_processors=procs
        ):
            wall.append(time.perf_counter())
            cpu.append(time.process_time())
        n = max(1, len(wall) - 1)
        return (wall[-1] - wall[0]) / n * 1e3, (cpu[-1] - cpu[0]) / n * 1e3

    run(False)  # warm up
    plain, masked = [], []
    for _ in range(pairs):
        plain.append(run(False))
        masked.append(run(True))
    logits = mx.zeros((1, lltok.vocab_size))
    bits = np.ones((logits.shape[-1] + 31) // 32, dtype=np.int32)
    t0 = time.perf_counter()
    for _ in range(200):
        allowed = np.unpackbits(bits.view(np.uint8), count=logits.shape[-1], bitorder="little")
        mx.eval(mx.where(mx.array(allowed.astype(bool)), logits, -float("inf")))
    return Decode(
        plain_ms=statistics.median(w for w, _ in plain),
        masked_ms=statistics.median(w for w, _ in masked),
        plain_cpu_ms=statistics.median(c for _, c in plain),
        masked_cpu_ms=statistics.median(c for _, c in masked),
        pairs=pairs,
        apply_us=(time.perf_counter() - t0) / 200 * 1e6,
    )


# --- report --------------------------------------------------------------------------


def table(results: list[Result], decode: Decode | None) -> str:
    base = next(r for r in results if r.name == "llguidance")
    step_ms = decode.plain_ms if decode is not None else None
    head = (
        "| library | version | import s | tokenizer s | compile ms | mask µs/token mean"
        " | p50 | p99 | vs llguidance | json_object | adds MB |"
    )
    if step_ms is not None:
        head += " mask / decode step |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        row = (
            f"| {r.name} | {r.version} | {r.import_s:.2f} | {r.tokenizer_s:.2f} |"
            f" {r.compile_ms:.1f} | {r.mean_us:.1f} | {r.pct(0.5):.1f} | {r.pct(0.99):.1f} |"
            f" {r.mean_us / base.mean_us:.2f}x | {r.json_object} |"
            f" {r.added_mb:.0f} |"
        )
        if step_ms is not None:
            row += f" {r.mean_us / 1e3 / step_ms * 100:.3f}% |"
        lines.append(row)
    if decode is not None:
        lines += [
            "",
            f"Decode on the real model (mlx_lm in process, temperature 0.7, 48 tokens,"
            f" {decode.pairs} alternating pairs, medians): {decode.plain_ms:.1f} ms/token plain,"
            f" {decode.masked_ms:.1f} with the neuron's GrammarMask (llguidance):"
            f" constrained/plain tok/s = {decode.plain_ms / decode.masked_ms:.3f}x by wall clock,"
            f" {decode.plain_cpu_ms / decode.masked_cpu_ms:.3f}x by process CPU"
            f" ({decode.plain_cpu_ms:.1f} vs {decode.masked_cpu_ms:.1f} ms/token)."
            f" Applying a mask to the logits (numpy bits to mx.where) costs"
            f" {decode.apply_us:.0f} µs a token.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.grammar",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=20, help="fresh matchers per library")
    p.add_argument("--pairs", type=int, default=6, help="plain/masked decode pairs")
    p.add_argument("--no-decode", action="store_true", help="skip the decode on the model")
    p.add_argument("--libraries", default=",".join(LIBRARIES), help="comma-separated")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from neuron.store.real_model import REAL_MODEL_ID, build_real_model, default_cache_dir

    model_dir = build_real_model(default_cache_dir() / "models" / REAL_MODEL_ID)
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    eos = [int(hf.eos_token_id)]
    tokens = hf.encode(json.dumps(BENCH_EXAMPLE), add_special_tokens=False)
    print(f"SmolLM2-135M tokenizer: {len(hf)} tokens; the example answer: {len(tokens)} tokens")
    results = []
    for name in args.libraries.split(","):
        if importlib.util.find_spec(MODULES[name]) is None:
            # Only llguidance is a dependency (the neuron's); the others are measured if there.
            print(f"  {name}: not installed (pip install {name}); left out", flush=True)
            continue
        r = measure(name, hf, eos, tokens, args.rounds)
        print(f"  {name}: compile {r.compile_ms:.1f} ms, mask {r.mean_us:.1f} µs/token", flush=True)
        results.append(r)
    decode = None if args.no_decode else decode_steps(model_dir, args.pairs)
    body = table(results, decode)
    print()
    print(body)
    if decode is not None and len(results) == len(LIBRARIES):  # a whole run is recorded
        benchmarks_md.update("bench-grammar", "python -m bench.grammar", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
