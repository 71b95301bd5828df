"""What cortex and neuron add on top of the runner, measured against peers in one run.

`python -m bench.proxy_overhead [--requests N] [--concurrency C] [--max-tokens T]`

Builds the demo model in a temp dir, starts one neuron and one cortex as child
processes, loads the model through cortex, then sends the same streamed chat
workload to each target in rounds (target order rotated every round, so drift
and noise are shared):

  direct   the runner itself (`mlx_lm.server`, the port neuron reports)
  nginx    nginx proxy_pass to the runner, buffering off (only if `nginx` is on PATH)
  neuron   the neuron's proxy (admission, heartbeats, frame counting)
  cortex   cortex -> neuron -> runner (routing, affinity, retries, two proxy hops)

and prints throughput, time to first token, total latency and ratios against
`direct`. Everything it started is stopped on exit, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from bench.common import (
    RUNNER_MODEL_NAME,
    Procs,
    Sample,
    Target,
    children,
    console_script,
    cpu_seconds,
    free_port,
    one_request,
    own_cpu_seconds,
    pids_mentioning,
    wait_http,
    workdir,
)
from shared.blocking_http import request_json

# -- processes -----------------------------------------------------------------------


# -- the fleet under test ----------------------------------------------------------------


def write_configs(
    root: Path, model_dir: Path, model_id: str, neuron_port: int, cortex_port: int, conc: int
) -> tuple[Path, Path]:
    neuron = root / "neuron.toml"
    # Admission and decode slots sized so the neuron never queues the workload:
    # we measure the proxy, not a cap.
    slots = max(8, conc)
    neuron.write_text(
        f'host = "127.0.0.1"\nport = {neuron_port}\nstore_dir = "{root / "store"}"\n'
        f'node_name = "bench-{model_id[-8:]}"\n'
        f'model_roots = ["{model_dir.parent}"]\n'
        f"[runner]\ndecode_concurrency = {slots}\nmax_tokens = 512\n"
        f"[admission]\nmax_in_flight = {slots}\nmax_queue = {4 * slots}\n"
    )
    (root / "models.toml").write_text(
        f'[[models]]\nid = "{model_id}"\nsource = "{model_dir}"\ncontext_limit = 2048\n'
    )
    cortex = root / "cortex.toml"
    cortex.write_text(
        f'host = "127.0.0.1"\nport = {cortex_port}\ncatalogue = "models.toml"\n'
        "poll_interval_s = 1.0\n\n"
        f'[[neurons]]\nname = "bench"\nurl = "http://127.0.0.1:{neuron_port}"\n'
    )
    return neuron, cortex


def load_model(cortex: str, neuron: str, model_id: str, procs: Procs, timeout_s: float) -> int:
    """Load through cortex; return the runner's port once cortex routes to it."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        procs.check()
        status, answer, _ = request_json("POST", f"{cortex}/admin/models/{model_id}/load")
        if status in (200, 202):
            break
        last = (status, answer)  # cortex may not have polled the neuron yet
        time.sleep(0.5)
    else:
        raise RuntimeError(f"load through cortex refused: {last}")
    port: int | None = None
    while time.monotonic() < deadline:
        procs.check()
        _, answer, _ = request_json("GET", f"{neuron}/models")
        for m in answer.get("models", []) if isinstance(answer, dict) else []:
            if m.get("model_id") == model_id and m.get("state") == "failed":
                raise RuntimeError(f"model failed on the neuron: {m.get('error')}")
            if m.get("model_id") == model_id and m.get("state") == "ready" and m.get("port"):
                port = int(m["port"])
        if port is not None:
            break
        time.sleep(0.25)
    else:
        raise RuntimeError(f"model {model_id} not ready on the neuron in {timeout_s:.0f}s")
    # Cortex learns of the ready replica at its next poll; honour Retry-After.
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() < deadline:
        procs.check()
        status, answer, headers = request_json("POST", f"{cortex}/v1/chat/completions", body)
        if status == 200:
            return port
        last = (status, answer)
        time.sleep(min(float(headers.get("Retry-After", 1) if headers else 1), 2.0))
    raise RuntimeError(f"cortex never routed to the loaded model: {last}")


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/logs/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/nginx-tmp/body;
    proxy_temp_path {root}/nginx-tmp/proxy;
    fastcgi_temp_path {root}/nginx-tmp/fastcgi;
    uwsgi_temp_path {root}/nginx-tmp/uwsgi;
    scgi_temp_path {root}/nginx-tmp/scgi;
    upstream runner {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://runner;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(nginx: str, root: Path, upstream: int, procs: Procs) -> str:
    port = free_port()
    (root / "nginx-tmp").mkdir()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, upstream=upstream, port=port))
    # -e: errors before the config is read go to our dir, not /var/log/nginx.
    procs.start(
        "nginx", [nginx, "-p", str(root), "-c", str(conf), "-e", str(root / "logs/nginx-error.log")]
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/models", procs, 15.0)
    return url


# -- the workload ------------------------------------------------------------------------


@attrs.define
class Tally:
    samples: list[Sample] = attrs.Factory(list)
    wall_s: float = 0.0
    round_ttft_p50: list[float] = attrs.Factory(list)
    # CPU seconds each process spent while this target's batches ran.
    cpu_s: dict[str, float] = attrs.Factory(dict)


def prompt(i: int, nonce: str) -> str:
    # Every target gets the same prompts in a round (same tokens generated at
    # temperature 0); the per-request prefix keeps the runner's small prompt
    # cache (4 entries) from serving them, as long as a round has > 8 requests.
    return f"[{nonce}-{i:04d}] Write a short story about a lighthouse keeper and a storm."


async def run_batch(
    t: Target, n: int, conc: int, max_tokens: int, nonce: str
) -> tuple[list[Sample], float]:
    """`n` requests, at most `conc` at once, over one keep-alive pool."""
    sem = asyncio.Semaphore(conc)
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def go(i: int) -> Sample:
            async with sem:
                return await one_request(session, t, prompt(i, nonce), max_tokens)

        start = time.perf_counter()
        samples = await asyncio.gather(*(go(i) for i in range(n)))
        return list(samples), time.perf_counter() - start


def rotated(targets: Sequence[Target], k: int) -> list[Target]:
    k %= len(targets)
    return [*targets[k:], *targets[:k]]


def cpu_now(pids: dict[str, list[int]]) -> dict[str, float]:
    out = {name: sum(cpu_seconds(p) for p in group) for name, group in pids.items()}
    out["client"] = own_cpu_seconds()
    return out


async def measure(
    targets: Sequence[Target],
    n: int,
    conc: int,
    max_tokens: int,
    rounds: int,
    pids: dict[str, list[int]],
) -> dict[str, Tally]:
    tallies = {t.name: Tally() for t in targets}
    # Warm every path (connections, runner caches, Python code paths) first.
    for t in targets:
        samples, _ = await run_batch(t, conc, conc, max_tokens, f"warm-{t.name}")
        bad = [s for s in samples if not s.ok]
        if bad:
            raise RuntimeError(f"{t.name}: warmup failed: {bad[0].error}")
    for r in range(rounds):
        for t in rotated(targets, r):
            before = cpu_now(pids)
            samples, wall = await run_batch(t, n, conc, max_tokens, f"r{r}")
            after = cpu_now(pids)
            tally = tallies[t.name]
            for k, v in after.items():
                tally.cpu_s[k] = tally.cpu_s.get(k, 0.0) + v - before[k]
            tally.samples.extend(samples)
            tally.wall_s += wall
            ok = [s.ttft_s for s in samples if s.ok]
            tally.round_ttft_p50.append(statistics.median(ok) if ok else float("nan"))
        line = "  ".join(
            f"{t.name} {tallies[t.name].round_ttft_p50[-1] * 1e3:6.1f}" for t in targets
        )
        print(f"  round {r + 1}/{rounds}  TTFT p50 ms: {line}", flush=True)
    return tallies


# -- report ----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    # Nearest-rank percentile: no interpolation between samples.
    idx = min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))
    return xs[idx]


@attrs.frozen
class Row:
    name: str
    ok: int
    failed: int
    rps: float
    ttft_p50: float
    ttft_p95: float
    total_p50: float
    tok_s: float
    tokens_per_req: float

    @classmethod
    def of(cls, name: str, tally: Tally) -> Row:
        ok = [s for s in tally.samples if s.ok]
        wall = tally.wall_s or float("nan")
        return cls(
            name=name,
            ok=len(ok),
            failed=len(tally.samples) - len(ok),
            rps=len(ok) / wall,
            ttft_p50=pct([s.ttft_s for s in ok], 50),
            ttft_p95=pct([s.ttft_s for s in ok], 95),
            total_p50=pct([s.total_s for s in ok], 50),
            tok_s=sum(s.tokens for s in ok) / wall,
            tokens_per_req=statistics.mean([s.tokens for s in ok]) if ok else float("nan"),
        )


def report(rows: Sequence[Row], tallies: dict[str, Tally]) -> str:
    head = (
        f"{'target':<8} {'ok':>5} {'fail':>4} {'req/s':>7} {'TTFT p50':>10} "
        f"{'TTFT p95':>10} {'total p50':>10} {'tok/s':>8} {'tok/req':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.name:<8} {r.ok:>5} {r.failed:>4} {r.rps:>7.2f} {r.ttft_p50 * 1e3:>8.1f}ms "
            f"{r.ttft_p95 * 1e3:>8.1f}ms {r.total_p50 * 1e3:>8.1f}ms {r.tok_s:>8.1f} "
            f"{r.tokens_per_req:>8.1f}"
        )
    base = next((r for r in rows if r.name == "direct"), None)
    if base is not None:
        lines.append("")
        lines.append("ratios vs direct (latency: >1 is slower; req/s and tok/s: <1 is slower)")
        for r in rows:
            if r is base:
                continue
            p = f"{r.name}/direct"
            lines.append(
                f"  {p:<14} TTFT p50 = {r.ttft_p50 / base.ttft_p50:.2f}x"
                f" (+{(r.ttft_p50 - base.ttft_p50) * 1e3:.1f} ms)"
                f"  TTFT p95 = {r.ttft_p95 / base.ttft_p95:.2f}x"
                f"  total p50 = {r.total_p50 / base.total_p50:.2f}x"
                f" (+{(r.total_p50 - base.total_p50) * 1e3:.1f} ms)"
                f"  req/s = {r.rps / base.rps:.2f}x  tok/s = {r.tok_s / base.tok_s:.2f}x"
            )
        # Per-round ratios share each round's noise; their spread shows how far to trust
        # the pooled figures above on a busy machine.
        lines.append("per-round TTFT p50 ratio vs direct (median [min..max] over rounds)")
        direct = tallies[base.name].round_ttft_p50
        for r in rows:
            if r is base:
                continue
            ratios = [a / b for a, b in zip(tallies[r.name].round_ttft_p50, direct, strict=True)]
            lines.append(
                f"  {r.name + '/direct':<14} {statistics.median(ratios):.2f}x"
                f" [{min(ratios):.2f}..{max(ratios):.2f}]"
            )
    procs = list(next(iter(tallies.values())).cpu_s)
    if procs:
        lines.append("")
        lines.append("CPU ms per request, by process, while each target ran (2 cores shared)")
        lines.append(f"  {'target':<8}" + "".join(f"{p:>9}" for p in procs) + f"{'sum':>9}")
        for r in rows:
            cpu = tallies[r.name].cpu_s
            n = max(1, r.ok + r.failed)
            cells = "".join(f"{cpu[p] * 1e3 / n:>9.2f}" for p in procs)
            lines.append(f"  {r.name:<8}{cells}{sum(cpu.values()) * 1e3 / n:>9.2f}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.proxy_overhead",
        description="Streamed chat throughput and latency: runner direct vs nginx, "
        "neuron and cortex in front of it, measured in the same run.",
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per target per round")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (target order rotates)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx peer")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    if min(args.requests, args.concurrency, args.max_tokens, args.rounds) < 1:
        parser.error("--requests, --concurrency, --max-tokens and --rounds must be >= 1")

    # A second Ctrl-C or a SIGTERM must still reach the finally below.
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with workdir("bench-proxy-", args.keep) as root:
        procs = Procs(root)
        try:
            return _run(args, root, procs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"bench.proxy_overhead: {exc}", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            procs.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: argparse.Namespace, root: Path, procs: Procs) -> int:
    model_dir = root / "model"
    model_id = f"bench-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    subprocess.run(
        [console_script("neuron"), "demo-model", str(model_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    nport, cport = free_port(), free_port()
    while cport == nport:
        cport = free_port()
    neuron_conf, cortex_conf = write_configs(
        root, model_dir, model_id, nport, cport, args.concurrency
    )
    neuron, cortex = f"http://127.0.0.1:{nport}", f"http://127.0.0.1:{cport}"
    procs.start("neuron", [console_script("neuron"), "serve", "-c", str(neuron_conf)])
    procs.start("cortex", [console_script("cortex"), "serve", "-c", str(cortex_conf)])
    wait_http(f"{neuron}/health", procs, 60.0)
    wait_http(f"{cortex}/health", procs, 60.0)
    runner_port = load_model(cortex, neuron, model_id, procs, 300.0)
    targets = [Target("direct", f"http://127.0.0.1:{runner_port}", RUNNER_MODEL_NAME)]
    nginx = None if args.no_nginx else shutil.which("nginx")
    if nginx is not None:
        targets.append(
            Target("nginx", start_nginx(nginx, root, runner_port, procs), RUNNER_MODEL_NAME)
        )
    targets += [Target("neuron", neuron, model_id), Target("cortex", cortex, model_id)]
    print(
        f"fleet up in {time.monotonic() - t0:.1f}s (runner :{runner_port}, neuron :{nport}, "
        f"cortex :{cport}{'' if nginx else ', nginx: not on PATH, skipped'})\n"
        f"workload: {args.requests} streamed chat requests x {args.rounds} rounds per target, "
        f"concurrency {args.concurrency}, max_tokens {args.max_tokens}, temperature 0; "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    # nginx's worker is a child of its master; the runner is the neuron's child,
    # in a process group of its own, named by our temp dir on its command line.
    # (The neuron's own figure must not include its runner child.)
    pids = {name: [p.pid, *(children(p.pid) if name == "nginx" else ())] for name, p in procs.procs}
    mine = set(pids_mentioning(str(root)))
    runner = [pid for pid in pids_mentioning("neuron.runner.main") if pid in mine]
    pids = {"runner": runner, **pids}
    tallies = asyncio.run(
        measure(targets, args.requests, args.concurrency, args.max_tokens, args.rounds, pids)
    )
    procs.check()
    rows = [Row.of(t.name, tallies[t.name]) for t in targets]
    print()
    print(report(rows, tallies))
    failed = [(name, s.error) for name, tl in tallies.items() for s in tl.samples if not s.ok]
    if failed:
        print(f"\n{len(failed)} failed request(s), first: {failed[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
