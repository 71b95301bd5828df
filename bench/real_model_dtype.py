"""The real model's speed on this machine: quantized weights against bfloat16.

`python -m bench.real_model_dtype [--rounds 3] [--no-write]`

Builds (or finds in the cache) SmolLM2-135M-Instruct twice with `neuron real-model`:
as converted (`quantized`: the GGUF's 4-bit blocks, an 8-bit embedding) and
`--dtype bfloat16` (the same values expanded). Loads both in this one process with
mlx_lm and, alternating between them each round so load from other work on the
machine falls on both alike, times with mlx_lm's generate_step (the runner's path):
the prefill of 128 and of 512 tokens (to the first token, a fresh KV cache each),
and 32 greedy decode steps after the 128-token prefill. Prints
tok/s per round, the median over rounds and the ratio bfloat16 / quantized (>1:
bfloat16 is faster), and each variant's greedy answer to one question, so a
speed-up that broke the model shows. Updates BENCHMARKS.md unless --no-write.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import benchmarks_md
from neuron.store.real_model import (
    DTYPES,
    Dtype,
    build_real_model,
    cache_model_name,
    default_cache_dir,
)

PREFILLS = (128, 512)
DECODE_STEPS = 32
# Plain English, repeated and cut to length: the prompt's content does not change
# the cost of a forward pass, only its length does.
TEXT = (
    "The fleet manager routes each request to a node that holds the model, loads "
    "models on demand, and tells the client whether a failure is worth retrying. "
)
QUESTION = "What is the capital of France?"
FIGURES = [*(f"prefill {n}" for n in PREFILLS), f"decode {DECODE_STEPS}"]


def load(dtype: Dtype) -> tuple[Any, Any, Path]:
    from mlx_lm import load as mlx_load

    path = build_real_model(
        default_cache_dir() / "models" / cache_model_name(dtype), dtype=dtype, progress=print
    )
    model, tok = mlx_load(str(path))[:2]
    return model, tok, path


def prompt_ids(tok: Any, n: int) -> list[int]:
    ids: list[int] = tok.encode(TEXT * (n // 20 + 1), add_special_tokens=False)
    return ids[:n]


def timed(model: Any, ids: list[int], decode_steps: int) -> tuple[float, float]:
    """Seconds to the first token (the prefill: what the runner does, mlx_lm's
    generate_step, logits only for the last prompt token) and for `decode_steps`
    greedy tokens after it (EOS does not stop generate_step)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    start = time.perf_counter()
    steps = generate_step(mx.array(ids), model, max_tokens=decode_steps + 1)
    next(steps)
    first = time.perf_counter()
    for _ in steps:
        pass
    return first - start, time.perf_counter() - first


def one_round(model: Any, tok: Any) -> dict[str, float]:
    """tok/s for each figure."""
    out: dict[str, float] = {}
    for n in PREFILLS:
        steps = DECODE_STEPS if n == PREFILLS[0] else 0
        prefill, decode = timed(model, prompt_ids(tok, n), steps)
        out[f"prefill {n}"] = n / prefill
        if steps:
            out[f"decode {steps}"] = steps / decode
    return out


def answer(model: Any, tok: Any) -> str:
    from mlx_lm import generate

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )
    return str(generate(model, tok, prompt=prompt, max_tokens=12)).replace("\n", " ")


def table(results: dict[Dtype, list[dict[str, float]]]) -> str:
    rows = [
        "| figure | quantized tok/s | bfloat16 tok/s | bfloat16 / quantized |",
        "|---|---|---|---|",
    ]
    for figure in FIGURES:
        q = statistics.median(r[figure] for r in results["quantized"])
        b = statistics.median(r[figure] for r in results["bfloat16"])
        rows.append(f"| {figure} | {q:.1f} | {b:.1f} | {b / q:.2f}x |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    models = {dtype: load(dtype) for dtype in DTYPES}
    for dtype, (_, _, path) in models.items():
        size = (path / "model.safetensors").stat().st_size
        print(f"{dtype:9s} {path} ({size / 1e6:.0f} MB of weights)")
    for model, tok, _ in models.values():
        timed(model, prompt_ids(tok, 16), 4)  # warm up: the first call pays for setup
    results: dict[Dtype, list[dict[str, float]]] = {dtype: [] for dtype in DTYPES}
    for i in range(args.rounds):
        # Alternate which goes first, so neither always runs on a warmer (or busier) CPU.
        for dtype in DTYPES if i % 2 == 0 else DTYPES[::-1]:
            model, tok, _ = models[dtype]
            got = one_round(model, tok)
            results[dtype].append(got)
            figures = "  ".join(f"{k} {v:6.1f}" for k, v in got.items())
            print(f"round {i + 1}/{args.rounds}  {dtype:9s}  tok/s: {figures}", flush=True)
    body = table(results)
    answers = "\n".join(f"- {d}: {answer(*models[d][:2])!r}" for d in DTYPES)
    print(
        f"\nmedian over {args.rounds} rounds\n{body}\n\ngreedy answers to {QUESTION!r}:\n{answers}"
    )
    if not args.no_write:
        benchmarks_md.update(
            "bench-real-model-dtype",
            "python -m bench.real_model_dtype"
            + (f" --rounds {args.rounds}" if args.rounds != 3 else ""),
            f"SmolLM2-135M in one process, quantized vs bfloat16 weights, median of "
            f"{args.rounds} alternating rounds.\n\n{body}\n\nGreedy answers to "
            f"{QUESTION!r}:\n{answers}\n",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
