"""Speculative decoding through a neuron: a model with a catalogue `draft_model` against
the same model without, and how often the draft is right.

`python -m bench.speculative [--rounds 2] [--tokens 32] [--num-draft-tokens 2,4] [--no-write]`

The pair: SmolLM2-135M-Instruct in bfloat16 (`neuron real-model --dtype bfloat16`)
as the model, and the same model quantized (`neuron real-model`: 4-bit blocks,
an 8-bit embedding) as its draft. They share the tokenizer, so a draft's token
ids mean the same to the model. The demo model cannot draft for it: its
tokenizer is another (the load refuses it, and the bench prints why), and a
truncation of the real model to its first 4 or 8 layers, tried while building
this, agreed with it on almost no token.

One neuron loads the model once plain and once per K in `--num-draft-tokens`
(`draft-K`) with the options a catalogue entry `draft_model = ...` /
`num_draft_tokens = K` sends (LoadRequest.options; mlx_lm.server's
--draft-model / --num-draft-tokens). Greedy (temperature 0) streamed chat
requests go to each arm in turn, the order rotating, so drift in the host's
load falls on all; decode tok/s is (tokens - 1) over the
time from the first content frame to the last, summed; the runner's CPU per
token (from /proc) is the same cost measured in a way other load cannot skew.

Acceptance: greedy speculative decoding emits the model's own tokens, so the
draft's proposal at each position is accepted when it equals the model's next
token given the model's own prefix. One forward pass of the draft over each
plain answer (teacher forcing) gives that agreement per position; the rate is
the acceptance rate, and replaying K-token drafts over it gives the share of
tokens that came from the draft (about K/(K+1) at most). Every arm's answers
must be the plain arm's text; the bench says whether they are.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from bench import benchmarks_md
from bench.common import Procs, cpu_seconds, free_port, wait_http, workdir
from neuron.store.demo_model import build_demo_model
from neuron.store.real_model import build_real_model, cache_model_name, default_cache_dir
from shared.blocking_http import request_json
from shared.runner_options import draft_problem

PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "What is the capital of France, and what is it known for?",
    "Give three tips for writing clear code.",
)


@attrs.frozen
class Answer:
    arm: str
    prompt: str
    text: str
    tokens: int
    decode_s: float
    runner_cpu_s: float


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


def models(root: Path) -> tuple[Path, Path, Path]:
    """(the model, its draft, the demo model): the real ones built once per machine."""
    cache = default_cache_dir() / "models"
    main = build_real_model(cache / cache_model_name("bfloat16"), dtype="bfloat16", progress=print)
    draft = build_real_model(cache / cache_model_name("quantized"), progress=print)
    demo = build_demo_model(root / "demo")
    return main, draft, demo


def start_neuron(root: Path, procs: Procs, roots: list[Path]) -> str:
    port = free_port()
    (root / "neuron.toml").write_text(
        f'port = {port}\nstore_dir = "{root / "store"}"\n'
        f"model_roots = {json.dumps([str(r) for r in roots])}\n"
        "[runner]\nmax_tokens = 512\n"
    )
    procs.start(
        "neuron", [sys.executable, "-m", "neuron.cli", "serve", "-c", str(root / "neuron.toml")]
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", procs, 120)
    return url


def load(url: str, procs: Procs, main: Path, draft: Path, ks: list[int]) -> dict[str, int]:
    """Every arm loaded and ready; their runners' pids."""
    arms = arm_names(ks)
    for arm, k in zip(arms, [0, *ks], strict=True):
        body: dict[str, Any] = {"model_id": arm, "source": str(main)}
        if k:
            body["options"] = {"draft_model": str(draft), "num_draft_tokens": k}
        status, answer, _ = request_json("POST", url + "/models/load", body)
        if status != 202:
            raise RuntimeError(f"load of {arm} refused: {status} {answer}")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        procs.check()
        _, answer, _ = request_json("GET", url + "/models")
        states = {m["model_id"]: m for m in answer.get("models", [])}
        failed = [m for m in states.values() if m["state"] == "failed"]
        if failed:
            raise RuntimeError(f"load failed: {failed[0].get('error')}")
        if all(states.get(a, {}).get("state") == "ready" for a in arms):
            return {a: runner_pid(a) for a in arms}
        time.sleep(0.5)
    raise RuntimeError("models not ready within 600 s")


def arm_names(ks: list[int]) -> list[str]:
    return ["plain", *(f"draft-{k}" for k in ks)]


def runner_pid(model_id: str) -> int:
    marker = f"--neuron-model-id\0{model_id}\0".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    raise RuntimeError(f"no runner for {model_id}")


def ask(url: str, arm: str, pid: int, prompt: str, tokens: int) -> Answer:
    """One greedy streamed request; its frames timed as they arrive."""
    import http.client
    from urllib.parse import urlsplit

    body = {
        "model": arm,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=900)
    cpu0 = cpu_seconds(pid)
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{arm}: {resp.status}: {resp.read()[:300]!r}")
    text, count, stamps = [], 0, []
    for line in resp:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        frame = json.loads(line[6:])
        if frame.get("usage"):
            count = int(frame["usage"]["completion_tokens"])
        for c in frame.get("choices") or ():
            if c["delta"].get("content"):
                text.append(c["delta"]["content"])
                stamps.append(time.perf_counter())
    conn.close()
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return Answer(arm, prompt, "".join(text), count, span, cpu_seconds(pid) - cpu0)


def run(url: str, pids: dict[str, int], rounds: int, tokens: int) -> dict[str, Arm]:
    names = list(pids)
    arms = {a: Arm() for a in names}
    for a in names:  # a first request each: the runners' first-call costs out of the way
        ask(url, a, pids[a], "hi", 4)
    turn = 0
    for r in range(rounds):
        for prompt in PROMPTS:
            turn += 1
            for a in names[turn % len(names) :] + names[: turn % len(names)]:
                ans = ask(url, a, pids[a], prompt, tokens)
                arms[a].answers.append(ans)
                rate = (ans.tokens - 1) / ans.decode_s if ans.decode_s else 0.0
                shown = f"{ans.tokens:3d} tok {rate:5.2f} tok/s {ans.text[:50]!r}"
                print(f"  round {r + 1} {a:8s} {shown}", flush=True)
    return arms


def agreement(main: Path, draft: Path, answers: list[Answer]) -> list[list[bool]]:
    """Per answer: does the draft's greedy token equal the model's, at each position of
    the model's own answer (one teacher-forced forward pass of the draft each)."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load

    tok = mlx_load(str(main))[1]
    model = mlx_load(str(draft))[0]
    out = []
    for a in answers:
        messages = [{"role": "user", "content": a.prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)  # type: ignore[no-untyped-call]
        answer = tok.encode(a.text, add_special_tokens=False)
        ids = list(prompt) + list(answer)
        logits = model(mx.array([ids]))
        guesses: list[int] = mx.argmax(logits[0, len(prompt) - 1 : len(ids) - 1], axis=-1).tolist()  # type: ignore[assignment]
        out.append([g == t for g, t in zip(guesses, answer, strict=True)])
    return out


def from_draft(agree: list[bool], k: int) -> int:
    """Tokens a K-token draft supplies over an answer: each step keeps the draft's
    leading agreeing proposals, then the model adds one token of its own."""
    i = supplied = 0
    while i < len(agree):
        n = 0
        while n < k and i + n < len(agree) and agree[i + n]:
            n += 1
        supplied += n
        i += n + 1
    return supplied


def report(arms: dict[str, Arm], agree: list[list[bool]], ks: list[int], refused: str) -> str:
    plain = arms["plain"]
    positions = sum(len(a) for a in agree)
    accepted = sum(sum(a) for a in agree)
    lines = [
        "SmolLM2-135M-Instruct bfloat16 through a neuron, plain and with its quantized"
        " copy as `draft_model` (num_draft_tokens K); greedy, streamed, one request at a"
        " time, the arms in turn.",
        "",
        "| arm | tok/s | vs plain | runner CPU ms/token | tokens | from the draft | same answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, arm), k in zip(arms.items(), [0, *ks], strict=True):
        count = sum(a.tokens for a in arm.answers)
        supplied = sum(from_draft(a, k) for a in agree) if k else 0
        same = sum(p.text == a.text for p, a in zip(plain.answers, arm.answers, strict=True))
        lines.append(
            f"| {name} | {arm.tok_s:.2f} | {arm.tok_s / plain.tok_s:.3f}x |"
            f" {arm.cpu_ms_per_token:.1f} | {count} | {supplied / max(1, positions):.1%} |"
            f" {same}/{len(plain.answers)} |"
        )
    lines += [
        "",
        f"Acceptance (the draft's greedy token is the model's, given the model's prefix):"
        f' {accepted}/{positions} = {accepted / max(1, positions):.1%}. "from the draft":'
        " tokens a K-token draft supplies, replayed over that agreement (about K/(K+1) at"
        " most). The runner's CPU per token is the cost other load on the host cannot skew.",
        f"The demo model as a draft: refused at load: {refused}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.speculative",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds of the prompts per arm")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens of every request")
    p.add_argument(
        "--num-draft-tokens",
        type=lambda v: [int(k) for k in v.split(",")],
        default=[2, 4],
        help="K, comma-separated: one drafted arm per K (default 2,4)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with workdir("bench-speculative-", args.keep) as root:
        procs = Procs(root)
        try:
            main_dir, draft_dir, demo = models(root)
            refused = draft_problem(main_dir, demo) or "not refused"
            print(f"demo model as a draft: {refused}", flush=True)
            url = start_neuron(root, procs, [main_dir.parent, root])
            pids = load(url, procs, main_dir, draft_dir, args.num_draft_tokens)
            print(f"neuron up, runners {pids}", flush=True)
            arms = run(url, pids, args.rounds, args.tokens)
        except KeyboardInterrupt:
            return 130
        finally:
            procs.stop()
    agree = agreement(main_dir, draft_dir, arms["plain"].answers)
    table = report(arms, agree, args.num_draft_tokens, refused)
    print()
    print(table)
    if not args.no_write:
        command = (
            f"python -m bench.speculative --rounds {args.rounds} --tokens {args.tokens}"
            f" --num-draft-tokens {','.join(str(k) for k in args.num_draft_tokens)}"
        )
        benchmarks_md.update("bench-speculative", command, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
