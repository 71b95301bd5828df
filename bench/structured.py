"""Structured output on the real model, through a neuron: valid answers and decode speed.

`python -m bench.structured [--n 50] [--keep]`

One neuron serves SmolLM2-135M-Instruct (`neuron real-model`). `--n` chat
requests at temperature 0.7 ask for an employee as JSON (the schema, with
nested objects, enums and integers, is bench/grammar.py's BENCH_SCHEMA, and is
also spelt out in the system prompt), with `response_format` json_schema
(constrained) and, alternating with them, without it (unconstrained: what
clients got before, if the 400 let them through). Every answer is parsed with
json.loads and validated with jsonschema. Streamed, one at a time: decode tok/s
is (completion tokens - 1) over the time from the first content frame to the
last, summed over the run; the runner's CPU per completion token (from /proc)
is the same ratio measured in a way other load on the host cannot skew.
A run of 50 or more per arm replaces the bench-structured section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from typing import Any

import attrs
import jsonschema

from bench import benchmarks_md
from bench.common import Procs, Target, children, cpu_seconds, workdir
from bench.grammar import BENCH_SCHEMA
from bench.neuron import build, start
from shared.blocking_http import request_json

SYSTEM = (
    "You describe people as JSON. Answer with one JSON object and nothing else, "
    "matching this JSON schema: " + json.dumps(BENCH_SCHEMA)
)
NOTE = (
    "SmolLM2-135M-Instruct through a neuron; temperature 0.7, streamed, one request at a"
    " time, the arms alternating; the schema is bench/grammar.py's BENCH_SCHEMA (nested"
    " objects, enums, integers), also given in the system prompt. Constrained: with"
    " `response_format` json_schema (before issue 18, a 400); unconstrained: without it."
)
# Runs of at least this many requests per arm are recorded in BENCHMARKS.md.
FULL_RUN = 50
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "employee", "schema": BENCH_SCHEMA, "strict": True},
}


@attrs.frozen
class Answer:
    constrained: bool
    text: str
    finish: str | None
    tokens: int
    decode_s: float  # first content frame to last
    runner_cpu_s: float
    parses: bool
    valid: bool


@attrs.define
class Arm:
    answers: list[Answer] = attrs.Factory(list)

    @property
    def tok_s(self) -> float:
        tokens = sum(max(0, a.tokens - 1) for a in self.answers)
        span = sum(a.decode_s for a in self.answers)
        return tokens / span if span else 0.0

    @property
    def cpu_ms_per_token(self) -> float:
        tokens = sum(a.tokens for a in self.answers)
        return sum(a.runner_cpu_s for a in self.answers) / tokens * 1e3 if tokens else 0.0

    def count(self, what: str) -> int:
        return sum(bool(getattr(a, what)) for a in self.answers)


def judge(text: str) -> tuple[bool, bool]:
    """(parses as JSON, validates against the schema)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    try:
        jsonschema.validate(value, BENCH_SCHEMA)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def ask(t: Target, runner_pid: int, i: int, constrained: bool, max_tokens: int) -> Answer:
    """One streamed request; its frames timed as they arrive."""
    import http.client
    from urllib.parse import urlsplit

    body: dict[str, Any] = {
        "model": t.model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Describe employee number {i} of a small company."},
        ],
        "temperature": 0.7,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if constrained:
        body["response_format"] = RESPONSE_FORMAT
    url = urlsplit(t.base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=600)
    cpu0 = cpu_seconds(runner_pid)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
    text, finish, tokens, stamps = [], None, 0, []
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        frame = json.loads(line[6:])
        if frame.get("usage"):
            tokens = int(frame["usage"]["completion_tokens"])
        for c in frame.get("choices") or ():
            if c["delta"].get("content"):
                text.append(c["delta"]["content"])
                stamps.append(time.perf_counter())
            finish = c.get("finish_reason") or finish
    conn.close()
    joined = "".join(text)
    parses, valid = judge(joined)
    return Answer(
        constrained=constrained,
        text=joined,
        finish=finish,
        tokens=tokens,
        decode_s=stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0,
        runner_cpu_s=cpu_seconds(runner_pid) - cpu0,
        parses=parses,
        valid=valid,
    )


def runner_of(neuron_pid: int) -> int:
    for pid in children(neuron_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"neuron.runner.main" in f.read():
                    return pid
        except OSError:
            continue
    raise RuntimeError("no runner under the neuron")


def run(t: Target, runner_pid: int, n: int, max_tokens: int) -> dict[bool, Arm]:
    arms = {True: Arm(), False: Arm()}
    ask(t, runner_pid, -1, True, 8)  # warm the prompt cache and the grammar's tokenizer
    for i in range(n):
        # Alternating, the constrained one first half the time: drift hits both alike.
        for constrained in (True, False) if i % 2 == 0 else (False, True):
            a = ask(t, runner_pid, i, constrained, max_tokens)
            arms[constrained].answers.append(a)
            tag = "constrained  " if constrained else "unconstrained"
            print(
                f"  {i + 1:3d}/{n} {tag} {a.tokens:3d} tok {a.finish!s:6}"
                f" valid={a.valid!s:5} {a.text[:70]!r}",
                flush=True,
            )
    return arms


def report(arms: dict[bool, Arm], n: int) -> str:
    on, off = arms[True], arms[False]
    lines = [
        NOTE,
        "",
        "| arm | parse | validate | tok/s | runner CPU ms/token | tokens/answer |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in (("constrained", on), ("unconstrained", off)):
        per = sum(a.tokens for a in arm.answers) / max(1, len(arm.answers))
        lines.append(
            f"| {name} | {arm.count('parses')}/{n} | {arm.count('valid')}/{n} |"
            f" {arm.tok_s:.2f} | {arm.cpu_ms_per_token:.1f} | {per:.1f} |"
        )
    lines += [
        "",
        f"Decode tok/s constrained / unconstrained: {on.tok_s / off.tok_s:.3f}x"
        f" (goal >= 0.9); by the runner's CPU per token:"
        f" {off.cpu_ms_per_token / on.cpu_ms_per_token:.3f}x.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.structured",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=50, help="requests per arm")
    p.add_argument("--max-tokens", type=int, default=120, help="max_tokens of every request")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with workdir("bench-structured-", args.keep) as root:
        procs = Procs(root)
        try:
            build(root / "model", "real", quick=False)
            _, neuron, neuron_pid = start(root, procs)
            runner_pid = runner_of(neuron_pid)
            status = request_json("GET", neuron.base_url + "/health")[0]
            print(f"neuron up (health {status}), runner pid {runner_pid}", flush=True)
            arms = run(neuron, runner_pid, args.n, args.max_tokens)
        except KeyboardInterrupt:
            return 130
        finally:
            procs.stop()
    table = report(arms, args.n)
    print()
    print(table)
    if args.n >= FULL_RUN:  # a short run (while developing) leaves the recorded one alone
        benchmarks_md.update("bench-structured", f"python -m bench.structured --n {args.n}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
