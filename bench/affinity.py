"""Prompt-cache affinity: multi-turn conversations over two real replicas, three routings.

`python -m bench.affinity [--model demo|real] [--conversations 8] [--turns 6] [--quick]`

Two real neurons, each running the model on a real `mlx_lm.server` runner: the
demo model (random weights, fast), or with `--model real` SmolLM2-135M-Instruct
(`neuron real-model`), whose cached prompt tokens are real tokens of English
(slow on a CPU: run it with fewer conversations and turns)
(the catalogue keeps 2 replicas loaded, so one lands on each), and for each arm
a fresh `cortex serve` in front of them with `routing` set to:

  round_robin   replicas in turn, load ignored
  least_loaded  the least busy replica, no affinity
  affinity      cortex's default: least loaded, but a conversation goes back to
                the replica that served its prefix (cortex.core.router.prefix_keys)

Workload per arm: `--conversations` chats that grow turn by turn (a system
prompt unique to the arm and conversation, then user turns of ~60 words each
and the model's own replies sent back), interleaved: turn t of every
conversation is sent at once (in a random order, 10 ms apart), then turn t+1.
A runner's prompt cache holds 4 sequences (the neuron's default), so 8
conversations fit two replicas only if each stays on one. Each request streams with
`stream_options.include_usage`; mlx_lm reports how many prompt tokens came from
its prompt cache in `usage.prompt_tokens_details.cached_tokens`. Reported: the
share of prompt tokens served from cache (all turns, and turns 2+ only, since a
first turn can hit nothing), and TTFT p50 (request sent -> first content frame).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from bench.benchmarks_md import machine, update
from bench.common import Procs, console_script, free_port, wait_http
from shared.blocking_http import request_json

ARMS = ("round_robin", "least_loaded", "affinity")
STAGGER_S = 0.01
# Words per user turn: 6 turns stay well inside the demo model's 2,048-token context.
USER_WORDS = 30
WORDS = [
    "river",
    "stone",
    "lantern",
    "market",
    "orchard",
    "signal",
    "harbor",
    "meadow",
    "copper",
    "violet",
    "engine",
    "garden",
    "winter",
    "compass",
    "thunder",
    "island",
    "pocket",
    "mirror",
    "canyon",
    "feather",
    "ladder",
    "planet",
    "silver",
]


@attrs.define
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    reply: str


def user_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def one_turn(
    session: aiohttp.ClientSession,
    base: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
) -> tuple[int, int, float, str]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft: float | None = None
    reply: list[str] = []
    usage: dict[str, Any] = {}
    buf = b""
    async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_any():
            buf = (buf + chunk).replace(b"\r\n", b"\n")
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data:") or ev[5:].strip() == b"[DONE]":
                    continue
                frame = json.loads(ev[5:])
                if frame.get("error"):
                    raise RuntimeError(f"error frame: {frame['error']}")
                if frame.get("usage"):
                    usage = frame["usage"]
                for choice in frame.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        reply.append(text)
    details = usage.get("prompt_tokens_details") or {}
    total = time.perf_counter() - start
    return (
        int(usage.get("prompt_tokens", 0)),
        int(details.get("cached_tokens", 0)),
        ttft if ttft is not None else total,
        "".join(reply),
    )


async def run_conversations(
    base: str, model: str, arm: str, conversations: int, turns: int, max_tokens: int
) -> list[Turn]:
    rng = random.Random(7)
    nonce = uuid.uuid4().hex[:8]
    chats: list[list[dict[str, str]]] = [
        [
            {
                "role": "system",
                "content": f"[{arm} {nonce} conversation {c}] You are a terse assistant. "
                + user_text(rng, 30),
            }
        ]
        for c in range(conversations)
    ]
    out: list[Turn] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for t in range(turns):
            for chat in chats:
                chat.append({"role": "user", "content": user_text(rng, USER_WORDS)})
            # Clients do not arrive in a fixed order: a fixed one would pin each
            # conversation to one replica under round-robin (8 per turn, 2 replicas).
            order = rng.sample(range(conversations), conversations)
            delay = {c: STAGGER_S * i for i, c in enumerate(order)}

            async def send(c: int, wait: float) -> tuple[int, int, float, str]:
                await asyncio.sleep(wait)  # arrival order as drawn
                return await one_turn(session, base, model, chats[c], max_tokens)

            answers = await asyncio.gather(*(send(c, delay[c]) for c in range(conversations)))
            for c, (prompt, cached, ttft, reply) in enumerate(answers):
                chats[c].append({"role": "assistant", "content": reply or "ok"})
                out.append(Turn(c, t, prompt, cached, ttft, reply))
    return out


def write_neuron(root: Path, name: str, prompt_cache: int) -> tuple[Path, int]:
    port = free_port()
    conf = root / f"{name}.toml"
    conf.write_text(
        f'host = "127.0.0.1"\nport = {port}\nstore_dir = "{root / name / "store"}"\n'
        f'node_name = "{name}"\nmodel_roots = ["{root}"]\n'
        "[runner]\ndecode_concurrency = 8\nmax_tokens = 512\n"
        f"prompt_cache_size = {prompt_cache}\n"
        "[admission]\nmax_in_flight = 8\nmax_queue = 32\n"
    )
    return conf, port


def wait_ready(neurons: list[str], model: str, procs: Procs, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        ready = 0
        for url in neurons:
            _, answer, _ = request_json("GET", f"{url}/models")
            for m in answer.get("models", []) if isinstance(answer, dict) else []:
                if m.get("model_id") == model and m.get("state") == "failed":
                    raise RuntimeError(f"model failed on {url}: {m.get('error')}")
                if m.get("model_id") == model and m.get("state") == "ready":
                    ready += 1
        if ready == len(neurons):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{model} not ready on every neuron within {timeout_s:.0f} s")


def routed(base: str, model: str, replicas: int, procs: Procs, timeout_s: float) -> None:
    """Until cortex routes to the model and sees every replica (its polls lag a second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        _, answer, _ = request_json("GET", f"{base}/v1/models")
        for m in answer.get("data", []) if isinstance(answer, dict) else []:
            if m.get("id") == model and len(m.get("locations") or ()) >= replicas:
                return
        time.sleep(0.5)
    raise RuntimeError(f"cortex never saw {replicas} replicas of {model}")


def summarize(turns: list[Turn]) -> dict[str, float]:
    later = [t for t in turns if t.turn > 0]

    def share(ts: list[Turn]) -> float:
        prompt = sum(t.prompt_tokens for t in ts)
        return sum(t.cached_tokens for t in ts) / prompt if prompt else 0.0

    return {
        "share": share(turns),
        "share_later": share(later),
        "ttft_p50_ms": statistics.median(t.ttft_s for t in turns) * 1e3,
        "ttft_p50_later_ms": statistics.median(t.ttft_s for t in later) * 1e3 if later else 0.0,
        "prompt_tokens": float(sum(t.prompt_tokens for t in turns)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.affinity",
        description="Cached prompt-token share and TTFT: round-robin, least-loaded, affinity.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench.affinity --quick",
    )
    parser.add_argument(
        "--model",
        choices=("demo", "real"),
        default="demo",
        help="demo: random weights (default); real: SmolLM2-135M-Instruct",
    )
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--quick", action="store_true", help="8 conversations x 4 turns")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated routings")
    parser.add_argument("--affinity-margin", type=int, default=None, help="cortex config key")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and its logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations, args.turns = 8, 4
    root = Path(tempfile.mkdtemp(prefix="bench-affinity-"))
    (root / "logs").mkdir()
    procs = Procs(root)
    model = f"{args.model}-aff"
    results: dict[str, dict[str, float]] = {}
    try:
        model_dir = root / "model"
        build = "real-model" if args.model == "real" else "demo-model"
        subprocess.run(
            [console_script("neuron"), build, str(model_dir)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        context = 8192 if args.model == "real" else 2048
        (root / "models.toml").write_text(
            f'[[models]]\nid = "{model}"\nsource = "{model_dir}"\ncontext_limit = {context}\n'
            "replicas = 2\nkeep_loaded = true\n"
        )
        neurons = []
        # Half the conversations fit one runner's prompt cache: they all stay
        # cached only if each conversation keeps to one replica.
        prompt_cache = max(1, args.conversations // 2)
        for name in ("n1", "n2"):
            conf, port = write_neuron(root, name, prompt_cache)
            procs.start(name, [console_script("neuron"), "serve", "-c", str(conf)])
            neurons.append((name, f"http://127.0.0.1:{port}"))
        for _, url in neurons:
            wait_http(f"{url}/health", procs, 60.0)
        refs = "".join(f'[[neurons]]\nname = "{n}"\nurl = "{u}"\n\n' for n, u in neurons)
        arms = [a for a in args.arms.split(",") if a]
        margin = ""
        if args.affinity_margin is not None:
            margin = f"affinity_margin = {args.affinity_margin}\n"
        for i, arm in enumerate(arms):
            port = free_port()
            conf = root / f"cortex-{arm}.toml"
            conf.write_text(
                f'host = "127.0.0.1"\nport = {port}\ncatalogue = "models.toml"\n'
                f'poll_interval_s = 1.0\nrouting = "{arm}"\n{margin}\n{refs}'
            )
            cortex = procs.start(
                f"cortex-{arm}", [console_script("cortex"), "serve", "-c", str(conf)]
            )
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", procs, 60.0)
            if i == 0:  # the first cortex's reconciler loads both replicas
                wait_ready([u for _, u in neurons], model, procs, 120.0)
            routed(base, model, 2, procs, 60.0)
            turns = asyncio.run(
                run_conversations(base, model, arm, args.conversations, args.turns, args.max_tokens)
            )
            results[arm] = summarize(turns)
            cortex.terminate()
            cortex.wait(timeout=30)
            procs.procs = [(n, p) for n, p in procs.procs if p is not cortex]
    finally:
        procs.stop()
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    if set(results) != set(ARMS):
        print(json.dumps(results, indent=1))
        return 0
    rr = results["round_robin"]
    lines = [
        f"| {args.conversations} conversations x {args.turns} turns, 2 replicas"
        " | cached share (all turns) | cached share (turns 2+) | vs round-robin"
        " | TTFT p50 ms | TTFT p50 turns 2+ | vs round-robin |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        r = results[arm]
        ratio = r["share"] / rr["share"] if rr["share"] else float("inf")
        lines.append(
            f"| {arm} | {r['share']:.1%} | {r['share_later']:.1%} | {ratio:.2f}x"
            f" | {r['ttft_p50_ms']:.1f} | {r['ttft_p50_later_ms']:.1f}"
            f" | {r['ttft_p50_ms'] / rr['ttft_p50_ms']:.2f}x |"
        )
    aff = results["affinity"]
    met_share = aff["share"] >= 2 * rr["share"]
    met_ttft = aff["ttft_p50_ms"] < rr["ttft_p50_ms"]
    lines.append("")
    lines.append(
        "Targets: affinity cached share >= 2x round-robin "
        f"{'met' if met_share else 'MISSED'}, lower TTFT p50 {'met' if met_ttft else 'MISSED'}"
        " (cached tokens: mlx_lm's usage.prompt_tokens_details.cached_tokens)."
    )
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        cmd = "python -m bench.affinity " + " ".join(argv if argv is not None else sys.argv[1:])
        section = "bench-affinity" + ("-real" if args.model == "real" else "")
        what = "SmolLM2-135M-Instruct" if args.model == "real" else "the demo model"
        update(section, cmd.strip(), f"Prompt-cache affinity, {what}.\n\n" + table)
        print(f"\nwrote BENCHMARKS.md ({machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
