"""`cortex bench MODEL`: tok/s and time to first token through the fleet, per replica.

Each replica in turn gets `--streams` concurrent streamed chat requests sent
through cortex and pinned to it (X-Cortex-Node, which needs the admin token),
so the figures include cortex's and the neuron's proxies: what a client sees.
Threads and blocking stdlib HTTP, like the other commands.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse
from typing import Any, TextIO

import attrs

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Target,
    add_connection_args,
    error_message,
    run,
)
from shared.rates import MIN_RATE_SPAN_S, MIN_RATE_TOKENS, NO_RATE, rate

NODE_HEADER = "X-Cortex-Node"

HELP = f"""\
Measure MODEL through cortex, replica by replica: --streams concurrent
streamed chat completions of up to --tokens tokens each, pinned to one replica
at a time (header X-Cortex-Node; admin token needed). Per replica: streams
that succeeded, tokens, aggregate tok/s (all tokens / wall time), per-stream
decode tok/s (tokens after the first / time after the first), and time to
first token (p50, max). Only replicas ready now are measured; nothing is loaded.

{CONNECTION_HELP}

exit status: 0 every stream succeeded, 1 a stream failed or no replica is ready,
             2 usage error or cortex unreachable, 130 Ctrl-C

example:
  cortex bench qwen2.5-7b --streams 4 --tokens 256"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="tok/s and time to first token of a model, per replica",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="catalogue id or alias")
    add_connection_args(p)
    p.add_argument("--streams", type=int, default=4, help="concurrent streams per replica")
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    p.add_argument("--nodes", help="comma-separated replicas to measure (default: all ready)")
    p.add_argument("--timeout", type=float, default=300.0, help="per request, s")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=main)


@attrs.frozen
class StreamResult:
    ok: bool
    tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    error: str | None = None

    @property
    def decode_tps(self) -> float | None:
        """Only over a real interval (shared.rates): a short, fast stream has none."""
        if self.ttft_s is None:
            return None
        return rate(self.tokens - 1, self.total_s - self.ttft_s, None)


def one_stream(
    base: str, headers: dict[str, str], model: str, prompt: str, tokens: int, timeout: float
) -> StreamResult:
    """One streamed request; tokens from the usage frame, else one per content chunk."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=timeout)
    body = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": prompt}],
    }
    start = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    try:
        conn.request(
            "POST",
            u.path.rstrip("/") + "/v1/chat/completions",
            json.dumps(body),
            {"Content-Type": "application/json", **headers},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            text = resp.read().decode(errors="replace")
            return StreamResult(ok=False, error=f"HTTP {resp.status}: {_message(text)}")
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                return StreamResult(ok=False, error=f"mid-stream: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return StreamResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    total = time.perf_counter() - start
    count = int(usage.get("completion_tokens", chunks)) if isinstance(usage, dict) else chunks
    return StreamResult(ok=True, tokens=count, ttft_s=ttft, total_s=total)


def bench_replica(
    base: str,
    headers: dict[str, str],
    node: str,
    model: str,
    *,
    streams: int,
    tokens: int,
    prompt: str,
    timeout: float,
) -> dict[str, Any]:
    results: list[StreamResult] = [StreamResult(ok=False, error="not run")] * streams
    pinned = {**headers, NODE_HEADER: node}

    def run(i: int) -> None:
        results[i] = one_stream(base, pinned, model, prompt, tokens, timeout)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    total = sum(r.tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    decode = [d for r in good if (d := r.decode_tps) is not None]
    return {
        "node": node,
        "streams": streams,
        "ok": len(good),
        "tokens": total,
        "wall_s": wall,
        "tok_s": rate(total, wall, None),
        "decode_tok_s_per_stream_p50": statistics.median(decode) if decode else None,
        "ttft_s_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_s_max": max(ttfts) if ttfts else None,
        "errors": [r.error for r in results if not r.ok],
    }


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.streams < 1 or args.tokens < 1:
        print("cortex bench: --streams and --tokens must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(args, "bench", lambda target: _bench(args, target, out))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _bench(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    state = target.get_ok("/admin/state", 10.0)
    entry = find_model(state, args.model)
    if entry is None:
        print(f"cortex bench: {args.model!r} is not in cortex's catalogue", file=sys.stderr)
        return EXIT_USAGE
    nodes = _nodes_to_measure(entry, args.nodes)
    if nodes is None:
        return EXIT_FAILED
    replicas = [
        bench_replica(
            target.url,
            target.headers,
            node,
            entry["id"],
            streams=args.streams,
            tokens=args.tokens,
            prompt=args.prompt,
            timeout=args.timeout,
        )
        for node in nodes
    ]
    report = {
        "model": entry["id"],
        "streams": args.streams,
        "max_tokens": args.tokens,
        "replicas": replicas,
    }
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    else:
        render(report, out)
    return EXIT_OK if all(r["ok"] == r["streams"] for r in replicas) else EXIT_FAILED


def find_model(state: Any, name: str) -> dict[str, Any] | None:
    """The /admin/state entry of a model named by id or alias."""
    models = state.get("models", []) if isinstance(state, dict) else []
    return next((m for m in models if name == m.get("id") or name in m.get("aliases", [])), None)


def ready_replicas(entry: dict[str, Any]) -> list[str]:
    """Nodes with a ready, healthy copy; a group is one replica, named by its rank 0
    (only rank 0 takes requests)."""
    return [
        p["node"]
        for p in entry.get("placements", [])
        if p.get("state") == "ready"
        and p.get("healthy")
        and (p.get("group") or {}).get("rank", 0) == 0
    ]


def _nodes_to_measure(entry: dict[str, Any], wanted_text: str | None) -> list[str] | None:
    """The replicas to measure (--nodes, else every ready one); None, said why, if none."""
    ready = ready_replicas(entry)
    if wanted_text:
        wanted = [n.strip() for n in wanted_text.split(",") if n.strip()]
        missing = [n for n in wanted if n not in ready]
        if missing:
            print(
                f"cortex bench: {entry['id']} is not ready on {', '.join(missing)} "
                f"(ready on: {', '.join(ready) or 'none'})",
                file=sys.stderr,
            )
            return None
        ready = wanted
    if not ready:
        print(
            f"cortex bench: {entry['id']} is ready on no node (load it first: cortex load "
            f"{entry['id']})",
            file=sys.stderr,
        )
        return None
    return ready


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.0f} ms"


def _num(x: float | None) -> str:
    return NO_RATE if x is None else f"{x:.1f}"


def render(report: dict[str, Any], out: TextIO) -> None:
    print(
        f"bench {report['model']}: {len(report['replicas'])} replica(s), "
        f"{report['streams']} stream(s) each, up to {report['max_tokens']} tokens per stream",
        file=out,
    )
    cols = ("node", "ok", "tokens", "tok/s", "tok/s/stream", "TTFT p50", "TTFT max", "wall")
    rows = [cols]
    for r in report["replicas"]:
        rows.append(
            (
                r["node"],
                f"{r['ok']}/{r['streams']}",
                str(r["tokens"]),
                _num(r["tok_s"]),
                _num(r["decode_tok_s_per_stream_p50"]),
                _ms(r["ttft_s_p50"]),
                _ms(r["ttft_s_max"]),
                f"{r['wall_s']:.2f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        cells = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
        print("  " + cells.rstrip(), file=out)
    for r in report["replicas"]:
        for e in r["errors"]:
            print(f"  {r['node']}: {e}", file=out)
    print(
        "  tok/s = completion tokens / wall time of the batch; tok/s/stream = decode rate "
        f"after the first token (median); {NO_RATE}: under {MIN_RATE_TOKENS} tokens or "
        f"{MIN_RATE_SPAN_S:g} s, too short to time",
        file=out,
    )


def _message(text: str) -> str:
    """An error answer's message; the raw text when it is not JSON."""
    try:
        return error_message(json.loads(text))
    except ValueError:
        return text[:500]
