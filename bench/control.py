"""Control-plane scale: one cortex polling 1,000 fake neurons, and its routing decisions.

`python -m bench.control [--nodes 1000] [--models 200] [--window 10] [--quick]`

The fake neurons are nginx (one worker, `access_log off`) listening on `--nodes`
loopback ports per arm and serving canned neuron answers as static files: a
C server costs next to nothing per request, so the CPU measured is cortex's own,
and nginx's static files carry an ETag and answer If-None-Match with 304 (no
body), exactly what a neuron's GET /status does for an unchanged node. (One
asyncio process with 1,000 sockets would itself need most of a core at these
rates on a 2-core machine, beside the cortex it measures.)

Two arms, in the same run, each a fresh `cortex serve` subprocess with
poll_interval_s = 1 over the same 200-model catalogue:

  status    each node serves /status: one request per node and second, a 304
  legacy    no /status (404 once): /health + /models + /store/storage per node
            and second, the poller before this change (and for older neurons)

Per arm, over `--window` seconds cut into `--slices` slices: cortex's CPU per slice
as a share of one core (/proc/PID/stat utime+stime, so other load on the machine
does not count), and at the end of each slice the poll round's wall time
(cortex_poll_round_seconds, read outside the CPU slices) and cortex's RSS; nginx's
CPU. Then, in process: a 1,000-node fleet (4 ready models each out of the 200, so
20 replicas per model, ~4,000 requests of cortex's own in flight) routed by
`Fleet.snapshot()` + `cortex.core.router.route` with a full affinity table
(bench.router_micro's fleet), p50/p99 of CPU time per decision, `--route-runs` times.

The table shows each figure's median over its slices (routing: over its runs); the
targets are judged on that median, with the spread (max - min) beside it and a flag
when the spread is wider than the margin to the target (bench.spread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import spread
from bench.benchmarks_md import machine, update
from bench.common import children, idle_health
from bench.router_micro import affinity_table, build, requests
from bench.spread import Target
from cortex.core.router import route

TARGET_ROUND_S = 1.0
TARGET_CPU = 0.25
TARGET_ROUTE_P99_US = 50.0
TARGET_RSS_MB = 150.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
STARTED_AT = 1_700_000_000.0


def free_ports(count: int) -> list[int]:
    """`count` consecutive loopback ports nobody listens on."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000 - count)
        ok = True
        for p in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + count))
    raise SystemExit("no free run of loopback ports")


def node_files(i: int, ids: list[str], *, status: bool) -> dict[str, Any]:
    held = [ids[i % len(ids)], ids[(i + 1) % len(ids)]]
    health = {
        "status": "idle",
        "node_id": f"fake-{i:04d}",
        "started_at": STARTED_AT,
        "uptime_s": 100.0,
        "memory_available_bytes": 48 << 30,
        "models": [idle_health(m) for m in held],
    }
    models = [
        {
            "model_id": m,
            "state": "ready",
            "source": f"org/{m}",
            "group": None,
            "port": 50000 + k,
            "memory_bytes": 2 << 30,
            "last_used": 0.0,
            "error": None,
            "staging": None,
        }
        for k, m in enumerate(held)
    ]
    staged = [
        {"name": f"org--{m}", "path": f"/store/models/org--{m}", "in_use": True} for m in held
    ]
    files: dict[str, Any] = {
        "health": health,
        "models": {"models": models},
        "store/storage": {"staged": staged, "staging": [], "partial": []},
        "discovery": {
            "node_id": f"fake-{i:04d}",
            "hostname": f"fake-{i:04d}.local",
            "version": "0.1.0",
            "os": "Linux",
            "kernel": "6.1",
            "arch": "x86_64",
            "chip": "bench",
            "memory_total_bytes": 64 << 30,
            "memory_available_bytes": 48 << 30,
            "unified_memory": False,
            "mlx_version": "0.29.0",
            "mlx_device": "cpu",
            "recommended_working_set_bytes": None,
            "backends": ["ring"],
            "rdma_ports": [],
            "disk_free_bytes": 500 << 30,
            "store_dir": "/store",
            "ring_host": "127.0.0.1",
            "started_at": STARTED_AT,
        },
    }
    if status:
        files["status"] = {"health": health, "models": models, "staged": staged}
    return files


def write_tree(root: Path, ports: list[int], ids: list[str], *, status: bool) -> None:
    for i, port in enumerate(ports):
        for rel, body in node_files(i, ids, status=status).items():
            path = root / str(port) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(body))


def start_nginx(tmp: Path, ports: list[int]) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit("bench.control needs nginx (make sysdeps installs it)")
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    listens = "\n".join(f"    listen 127.0.0.1:{p} reuseport;" for p in ports)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  default_type application/json;
  keepalive_timeout 120s;
  keepalive_requests 100000000;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
  server {{
{listens}
    root {tmp}/nodes/$server_port;
    location / {{ try_files $uri =404; }}
  }}
}}
"""
    )
    proc = subprocess.Popen(
        [nginx, "-e", str(tmp / "error.log"), "-p", str(tmp), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nginx failed: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", ports[-1]), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("nginx did not start listening")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


def round_s(base: str) -> float:
    for line in get(base + "/metrics").decode().splitlines():
        if line.startswith("cortex_poll_round_seconds "):
            return float(line.split()[1])
    return float("nan")


# A figure's values over the slices (or runs) of one arm.
Figures = dict[str, list[float]]
# routing(): p50s, p99s, route-alone p50s (µs, one per run), the fleet's shape.
Routing = tuple[list[float], list[float], list[float], str]


def run_arm(
    tmp: Path,
    arm: str,
    ports: list[int],
    ids: list[str],
    window: float,
    nginx_pid: int,
    slices: int = 1,
) -> Figures:
    cat = tmp / f"{arm}-models.toml"
    cat.write_text(
        "".join(f'[[models]]\nid = "{m}"\nsource = "org/{m}"\nmemory_gb = 2.0\n\n' for m in ids)
    )
    (port,) = free_ports(1)
    cfg = tmp / f"{arm}-cortex.toml"
    neurons = "".join(
        f'[[neurons]]\nname = "n{i:04d}"\nurl = "http://127.0.0.1:{p}"\n\n'
        for i, p in enumerate(ports)
    )
    cfg.write_text(
        f'host = "127.0.0.1"\nport = {port}\ncatalogue = "{cat}"\n'
        f"poll_interval_s = 1.0\n\n{neurons}"
    )
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.cli", "serve", "-c", str(cfg), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"{arm}-cortex.log", "wb"),  # noqa: SIM115
    )
    try:
        deadline = time.monotonic() + 90
        healthy = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"cortex exited: see {tmp / f'{arm}-cortex.log'}")
            with contextlib.suppress(OSError):
                healthy = json.loads(get(base + "/health"))["nodes"]["healthy"]
            if healthy == len(ports):
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"{arm}: only {healthy} of {len(ports)} nodes healthy after 90 s")
        time.sleep(3)  # a few rounds in: connections open, 304s flowing
        out = sample(proc.pid, base, nginx_pid, window, slices)
        out["healthy"] = [json.loads(get(base + "/health"))["nodes"]["healthy"]]
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sample(pid: int, base: str, nginx_pid: int, window: float, slices: int) -> Figures:
    """CPU shares (cortex's, nginx's) per slice of `window`; after each slice, outside
    it, the last poll round's time and RSS (so reading /metrics costs no slice)."""
    # nginx's worker is a child of its master.
    ng = [nginx_pid, *children(nginx_pid)]
    out: Figures = {"round_s": [], "cpu": [], "rss_mb": [], "nginx_cpu": []}
    for _ in range(max(1, slices)):
        c0, n0, t0 = cpu_s(pid), sum(map(cpu_s, ng)), time.monotonic()
        time.sleep(window / max(1, slices))
        c1, n1, t1 = cpu_s(pid), sum(map(cpu_s, ng)), time.monotonic()
        out["cpu"].append((c1 - c0) / (t1 - t0))
        out["nginx_cpu"].append((n1 - n0) / (t1 - t0))
        out["rss_mb"].append(rss_mb(pid))
        out["round_s"].append(round_s(base))
    return out


def routing(nodes: int, models: int, calls: int, runs: int = 1) -> Routing:
    """Per run of `calls` decisions: p50, p99 of CPU µs per decision (snapshot + route
    with affinity), and route alone p50; one fleet, warmed once."""
    # 4 models a node, or enough that every catalogued model has a replica.
    fleet, snap, cat, ids = build(nodes, max(4, -(-models // nodes)), 0, catalogued=models)
    reqs = requests(ids, calls, 0)
    aff = affinity_table(snap, reqs, 0).view()
    clock = time.process_time_ns
    for name, keys in reqs[:500]:  # warm
        route(fleet.snapshot(), cat, name, prefix=keys, affinity=aff)
    p50s, p99s, alone_p50s = [], [], []
    for _ in range(max(1, runs)):
        both, alone = [], []
        for name, keys in reqs:
            t = clock()
            route(fleet.snapshot(), cat, name, prefix=keys, affinity=aff)
            both.append(clock() - t)
            t = clock()
            route(snap, cat, name, prefix=keys, affinity=aff)
            alone.append(clock() - t)
        both.sort()
        alone.sort()
        p50s.append(both[len(both) // 2] / 1e3)
        p99s.append(both[int(len(both) * 0.99)] / 1e3)
        alone_p50s.append(alone[len(alone) // 2] / 1e3)
    replicas = sum(len(snap.locations(m)) for m in ids) / len(ids)
    shape = (
        f"{replicas:.0f} replicas per model, {sum(snap.outstanding.values()):,} requests in flight"
    )
    return p50s, p99s, alone_p50s, shape


TARGETS = {
    "round_s": Target(
        "poll round wall time, /status", "<=", TARGET_ROUND_S, "s", ".3f", per="slice"
    ),
    "cpu": Target(
        "cortex CPU, share of one core, /status", "<", TARGET_CPU, "", ".3f", per="slice"
    ),
    "rss_mb": Target("cortex RSS, /status", "<", TARGET_RSS_MB, "MB", ".1f", per="slice"),
    "route_p99": Target("routing p99, snapshot + route", "<", TARGET_ROUTE_P99_US, "µs", ".1f"),
}


def verdicts(status: Figures, route_p99: list[float]) -> list[str]:
    """Each target over its slices or runs: median, margin, spread (bench.spread)."""
    figures = {**status, "route_p99": route_p99}
    lines, judged = [], []
    for key, target in TARGETS.items():
        line, verdict = spread.line_for(target, figures.get(key, []))
        lines.append(line)
        judged.append(verdict)
    return [
        "Targets: the median over a figure's slices or runs; spread = max - min.",
        *lines,
        spread.summary(judged),
    ]


def table(args: argparse.Namespace, results: dict[str, Figures], route: Routing) -> str:
    p50s, p99s, alone, shape = route
    med = statistics.median
    st = {k: med(v) for k, v in results["status"].items()}
    lg = {k: med(v) for k, v in results["legacy"].items()}
    rows = [
        ("poll round wall time (s)", "round_s", f"<= {TARGET_ROUND_S:g}"),
        ("cortex CPU (share of one core)", "cpu", f"< {TARGET_CPU:g}"),
        ("cortex RSS (MB)", "rss_mb", f"< {TARGET_RSS_MB:g}"),
        ("nginx CPU (share of one core)", "nginx_cpu", ""),
        ("nodes healthy at the end", "healthy", f"{args.nodes:g}"),
    ]
    lines = [
        f"| {args.nodes} fake neurons (nginx), {args.models} catalogued, poll_interval_s = 1"
        f" (median over {args.slices} slices of a {args.window:g} s window)"
        " | /status (304s) | old three calls | status/old | target |",
        "|---|---|---|---|---|",
    ]
    for label, key, target in rows:
        a, b = st[key], lg[key]
        ratio = f"{a / b:.2f}x" if b else "-"
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio} | {target} |")
    lines.append("")
    lines.append(
        f"Routing decision in process ({args.nodes} nodes, {shape}, full affinity"
        f" table; CPU time per call, {args.calls} calls, median of {len(p99s)} runs):"
        f" snapshot + route p50 {med(p50s):.1f} µs, p99 {med(p99s):.1f} µs (target p99 <"
        f" {TARGET_ROUTE_P99_US:g} µs); route alone p50 {med(alone):.1f} µs."
    )
    lines += ["", *verdicts(results["status"], p99s)]
    return "\n".join(lines)


def measure_arms(args: argparse.Namespace, ids: list[str]) -> dict[str, Figures]:
    """Both arms, one after the other, against one nginx serving both port ranges."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-control-"))
    tmp.chmod(0o755)  # nginx workers run as another user when started by root
    results: dict[str, Figures] = {}
    try:
        ports = free_ports(2 * args.nodes)
        arms = {"status": ports[: args.nodes], "legacy": ports[args.nodes :]}
        for arm, p in arms.items():
            write_tree(tmp / "nodes", p, ids, status=arm == "status")
        nginx = start_nginx(tmp, ports)
        try:
            for arm, p in arms.items():
                results[arm] = run_arm(tmp, arm, p, ids, args.window, nginx.pid, args.slices)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.control",
        description="Poll-round time, CPU and RSS of cortex over 1,000 fake neurons; routing p99.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench.control --quick",
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--window", type=float, default=15.0, help="CPU window per arm, s")
    parser.add_argument("--slices", type=int, default=5, help="slices of the window (spread)")
    parser.add_argument("--calls", type=int, default=20000, help="routing decisions timed")
    parser.add_argument("--route-runs", type=int, default=3, help="runs of --calls decisions")
    parser.add_argument("--quick", action="store_true", help="6 s windows, 5,000 decisions")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.calls = 6.0, 5000
    ids = [f"model-{j:03d}" for j in range(args.models)]
    results = measure_arms(args, ids)
    route = routing(args.nodes, args.models, args.calls, args.route_runs)
    text = table(args, results, route)
    print(text)
    if not args.no_write:
        cmd = "python -m bench.control" + (" --quick" if args.quick else "")
        update("bench-control", cmd, "Control plane: 1,000 neurons.\n\n" + text)
        print(f"\nwrote BENCHMARKS.md ({machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
