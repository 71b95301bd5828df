"""The gateway hot path against its peers, on fake upstreams that cost next to nothing.

`python -m bench.gateway [--quick] [--duration S] [--no-litellm] [--repeat N] [--paced-runs N]`
(make bench-gateway)

Upstreams (so that only the proxy's own cost shows):
  * nginx with canned answers: a chat completion (JSON) or a 32-frame SSE stream
    (`X-Bench-Stream: 1`), plus a neuron's poll endpoints (/health, /models,
    /store/storage, /discovery, built from shared.wire records) so cortex takes it
    for a neuron with model `bench` ready; as the neuron's runner, an nginx that
    always streams;
  * bench.token_server, a small asyncio program that streams one frame per token
    at a set rate (default 20 tokens/s, 64 frames) for many concurrent streams.
Arms: direct (the fake itself), nginx proxy_pass, aiohttp (bench.bare_proxy: a bare
aiohttp reverse proxy on uvloop, the floor of any Python hop on this CPU), cortex,
neuron, LiteLLM proxy. Every cortex and neuron figure is printed over the aiohttp
arm's from the same run.
Load: wrk (one thread, a lua script for the POST body) at c=1, 32 and 256,
non-streamed and streamed, for req/s and latency p50/p99; an aiohttp client for
256 paced streams (aggregate tokens/s, time to first token). CPU of each proxy
(and of the fake) comes from /proc (utime+stime) across each run. Servers are
pinned to CPU 0 and the load generators to CPU 1 (taskset) where there are two.
The wrk cells issue 21's targets read run `--repeat` times and the paced streams
`--paced-runs` times (3 each; `--quick` 1), interleaved across arms; each target is
judged on the median over its runs, with the spread beside it and a flag when the
spread is wider than the margin (bench.spread). The 256 paced streams' target holds
in each run.
The table goes to stdout and to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from bench import benchmarks_md, spread
from bench.common import Procs, cpu_seconds, free_port, idle_health, workdir
from bench.spread import Target
from bench.token_server import token_frame
from shared.blocking_http import request_json
from shared.serve import new_event_loop
from shared.wire import Discovery

SSE_FRAMES = 32
CONCURRENCY = (1, 32, 256)
ARMS = ("direct", "nginx", "aiohttp", "cortex", "neuron", "litellm")
# The hops measured against the framework floor, the aiohttp arm.
FLOOR, HOPS = "aiohttp", ("cortex", "neuron")
SERVER_CPU, CLIENT_CPU = "0", "1"
LITELLM_KEY = "sk-bench-0123456789abcdef"


# -- canned answers ----------------------------------------------------------------------


def completion_json(model: str = "bench") -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "t0 t1 t2 t3"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def canned_sse(frames: int = SSE_FRAMES) -> bytes:
    body = [token_frame(i) for i in range(frames - 1)]
    return b"".join([*body, token_frame(frames, last=True), b"data: [DONE]\n\n"])


def poll_answers(model: str, name: str) -> dict[str, Any]:
    """What a neuron with `model` ready answers to cortex's polls (shared.wire shapes)."""
    started = time.time()
    node_id = f"bench-{name}"
    discovery = Discovery(
        node_id=node_id,
        hostname=f"{name}.bench",
        version="0.1.0",
        os="Linux",
        kernel="6",
        arch="x86_64",
        chip="bench",
        memory_total_bytes=64 << 30,
        memory_available_bytes=48 << 30,
        unified_memory=False,
        mlx_version="0",
        mlx_device="cpu",
        recommended_working_set_bytes=None,
        backends=("ring",),
        rdma_ports=(),
        disk_free_bytes=500 << 30,
        store_dir="/tmp/store",
        ring_host="127.0.0.1",
        started_at=started,
    )
    health_model = idle_health(model)
    status = {
        "model_id": model,
        "state": "ready",
        "source": model,
        "group": None,
        "port": 1,
        "memory_bytes": 1 << 30,
        "last_used": 0.0,
        "error": None,
        "staging": None,
    }
    return {
        "/health": {
            "status": "idle",
            "node_id": node_id,
            "started_at": started,
            "uptime_s": 1.0,
            "memory_available_bytes": 47 << 30,
            "models": [health_model],
        },
        "/models": {"models": [status]},
        "/store/storage": {"staged": [], "staging": [], "partial": []},
        "/discovery": discovery.to_json(),
    }


def _ngx(text: bytes | str) -> str:
    """A literal for nginx's `return` (single-quoted; the answers hold no quote or $)."""
    s = text.decode() if isinstance(text, bytes) else text
    assert "'" not in s and "$" not in s and "\\" not in s
    return "'" + s + "'"


NGINX_HEAD = """\
worker_processes 1;
daemon off;
pid {root}/{name}.pid;
error_log {root}/logs/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {root}/nginx-tmp/{name}-body;
    proxy_temp_path {root}/nginx-tmp/{name}-proxy;
    fastcgi_temp_path {root}/nginx-tmp/{name}-fastcgi;
    uwsgi_temp_path {root}/nginx-tmp/{name}-uwsgi;
    scgi_temp_path {root}/nginx-tmp/{name}-scgi;
"""


def _write_answers(root: Path) -> tuple[Path, Path]:
    """The canned stream and completion as files (nginx caps a `return` at 4 KB)."""
    www = root / "www"
    www.mkdir(exist_ok=True)
    (www / "sse").write_bytes(canned_sse())
    (www / "json").write_bytes(completion_json())
    return www / "sse", www / "json"


# nginx answers POST to a static file with 405; `error_page 405 =200 $uri` serves it.
_FILE = "internal; default_type {kind}; alias {path}; error_page 405 =200 $uri;"


def fake_conf(root: Path, port: int, polls: dict[str, Any]) -> str:
    sse_path, json_path = _write_answers(root)
    sse = _FILE.format(kind="text/event-stream", path=sse_path)
    answer = _FILE.format(kind="application/json", path=json_path)
    poll = "".join(
        f"        location = {path} {{ default_type application/json;"
        f" return 200 {_ngx(json.dumps(v))}; }}\n"
        for path, v in polls.items()
    )
    return (
        NGINX_HEAD.format(root=root, name="fake")
        + f"""\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            if ($http_x_bench_stream) {{ rewrite ^ /_sse last; }}
            rewrite ^ /_json last;
        }}
        location ~ ^/sse/ {{ rewrite ^ /_sse last; }}
        location ~ ^/json/ {{ rewrite ^ /_json last; }}
        location = /_sse {{ {sse} }}
        location = /_json {{ {answer} }}
{poll}    }}
}}
"""
    )


def runner_conf_template(root: Path) -> str:
    """The neuron's runner as nginx: always a stream (the neuron always asks for one)."""
    sse_path, _ = _write_answers(root)
    sse = _FILE.format(kind="text/event-stream", path=sse_path)
    return (
        NGINX_HEAD.format(root=root, name="runner-@PORT@")
        + f"""\
    server {{
        listen 127.0.0.1:@PORT@ backlog=4096;
        location = /health {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
        location / {{ rewrite ^ /_sse last; }}
        location = /_sse {{ {sse} }}
    }}
}}
"""
    )


def proxy_conf(root: Path, routes: dict[int, int]) -> str:
    """nginx proxy_pass, buffering off, keep-alive upstreams: listen port -> upstream."""
    out = [NGINX_HEAD.format(root=root, name="proxy")]
    for listen, up in routes.items():
        out.append(f"""\
    upstream up{up} {{ server 127.0.0.1:{up}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{listen} backlog=4096;
        location / {{
            proxy_pass http://up{up};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
""")
    out.append("}\n")
    return "".join(out)


# -- processes -----------------------------------------------------------------------------


def pinned(cpu: str, argv: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        return argv
    return [taskset, "-c", cpu, *argv]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (LiteLLM's workers, nginx's worker)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def wait_http(url: str, procs: Procs, timeout_s: float, ok: Any = None) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(OSError):
            status, answer, _ = request_json("GET", url, timeout=2.0)
            last = (status, answer)
            if status == 200 and (ok is None or ok(answer)):
                return answer
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout_s:.0f}s: {last}")


@attrs.frozen
class Arm:
    name: str
    url: str
    # Model names for canned (JSON/SSE) and paced requests.
    json_model: str
    sse_model: str
    paced_model: str
    paced_url: str
    # Whose CPU is the proxy's.
    pids: tuple[int, ...]
    # Sent with every request (LiteLLM's master key).
    auth: str = ""


def start_all(
    root: Path, procs: Procs, litellm: bool, rate: float, frames: int, profile: Path | None
) -> list[Arm]:
    py = sys.executable

    def python_m(name: str, module: str) -> list[str]:
        if profile is None:
            return [py, "-m", module]
        # pyinstrument writes its text profile when the server exits (SIGTERM).
        out = profile.resolve() / f"{name}.txt"
        return [py, "-m", "pyinstrument", "-r", "text", "-o", str(out), "-m", module]

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    (root / "nginx-tmp").mkdir()
    fake_port, token_port = free_port(), free_port()
    # The fake neuron (nginx) and the paced fake (token server).
    (root / "fake.conf").write_text(fake_conf(root, fake_port, poll_answers("bench", "fake")))
    ngx = [nginx, "-p", str(root), "-e", str(root / "logs/nginx-error.log")]
    fake = procs.start("fake", pinned(SERVER_CPU, [*ngx, "-c", str(root / "fake.conf")]))
    (root / "paced.json").write_text(json.dumps(poll_answers("paced", "paced")))
    token_argv = [py, "-m", "bench.token_server", "--rate", str(rate), "--frames", str(frames)]
    paced = procs.start(
        "token",
        pinned(
            SERVER_CPU,
            [*token_argv, "--port", str(token_port), "--canned", str(root / "paced.json")],
        ),
    )
    fake_url, token_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{token_port}"
    wait_http(fake_url + "/health", procs, 15)
    wait_http(token_url + "/health", procs, 15)
    fake_pids = (fake.pid, *descendants(fake.pid))
    arms = [Arm("direct", fake_url, "bench", "bench", "paced", token_url, ())]
    del fake_pids, paced

    # nginx proxy_pass in front of both.
    p1, p2 = free_port(), free_port()
    (root / "proxy.conf").write_text(proxy_conf(root, {p1: fake_port, p2: token_port}))
    proxy = procs.start("nginx-proxy", pinned(SERVER_CPU, [*ngx, "-c", str(root / "proxy.conf")]))
    wait_http(f"http://127.0.0.1:{p1}/health", procs, 15)
    arms.append(
        Arm(
            "nginx",
            f"http://127.0.0.1:{p1}",
            "bench",
            "bench",
            "paced",
            f"http://127.0.0.1:{p2}",
            tuple(descendants(proxy.pid)),
        )
    )
    arms.append(start_bare(procs, fake_url, token_url))

    # cortex with both fakes as its neurons.
    cport = free_port()
    (root / "models.toml").write_text(
        '[[models]]\nid = "bench"\nsource = "bench/bench"\n\n'
        '[[models]]\nid = "paced"\nsource = "bench/paced"\n'
    )
    (root / "cortex.toml").write_text(
        f'host = "127.0.0.1"\nport = {cport}\ncatalogue = "models.toml"\npoll_interval_s = 1.0\n\n'
        f'[[neurons]]\nname = "fake"\nurl = "{fake_url}"\n\n'
        f'[[neurons]]\nname = "paced"\nurl = "{token_url}"\n'
    )
    cortex = procs.start(
        "cortex",
        pinned(
            SERVER_CPU,
            [*python_m("cortex", "cortex.cli"), "serve", "-c", str(root / "cortex.toml")],
        ),
    )
    curl = f"http://127.0.0.1:{cport}"
    _routed(curl, ("bench", "paced"), procs)
    arms.append(Arm("cortex", curl, "bench", "bench", "paced", curl, (cortex.pid,)))

    # A neuron whose runners are fakes: nginx for `bench`, the token server for `paced`.
    subprocess.run(
        [py, "-m", "neuron.cli", "demo-model", str(root / "model")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    (root / "runner.conf.in").write_text(runner_conf_template(root))
    wrapper = root / "fake-runner"
    wrapper.write_text(
        "#!/bin/sh\n# The neuron's runner command line, served by a fake.\n"
        'port=""; model=""\n'
        'while [ $# -gt 0 ]; do case "$1" in --port) port="$2";; '
        '--neuron-model-id) model="$2";; esac; shift; done\n'
        'if [ "$model" = paced ]; then\n'
        f'  exec {" ".join(token_argv)} --port "$port"\nfi\n'
        f'sed "s/@PORT@/$port/g" {root}/runner.conf.in > {root}/runner-$port.conf\n'
        f"exec {' '.join(ngx)} -c {root}/runner-$port.conf\n"
    )
    wrapper.chmod(0o755)
    nport = free_port()
    (root / "neuron.toml").write_text(
        f'host = "127.0.0.1"\nport = {nport}\nstore_dir = "{root / "store"}"\n'
        f'model_roots = ["{root}"]\nnode_name = "bench"\n'
        f'[runner]\npython = "{wrapper}"\ndecode_concurrency = 512\n'
        "[admission]\nmax_in_flight = 512\nmax_queue = 2048\n"
    )
    neuron = procs.start(
        "neuron",
        pinned(
            SERVER_CPU,
            [*python_m("neuron", "neuron.cli"), "serve", "-c", str(root / "neuron.toml")],
        ),
    )
    nurl = f"http://127.0.0.1:{nport}"
    wait_http(nurl + "/health", procs, 60)
    for model in ("bench", "paced"):
        status, answer, _ = request_json(
            "POST", nurl + "/models/load", {"model_id": model, "source": str(root / "model")}
        )
        if status != 202:
            raise RuntimeError(f"neuron refused to load {model}: {status} {answer}")
    wait_http(
        nurl + "/models",
        procs,
        60,
        ok=lambda a: sum(m.get("state") == "ready" for m in a.get("models", [])) == 2,
    )
    arms.append(Arm("neuron", nurl, "bench", "bench", "paced", nurl, (neuron.pid,)))

    if litellm:
        arms.append(start_litellm(root, procs, fake_url, token_url))
    return arms


def start_bare(procs: Procs, fake_url: str, token_url: str) -> Arm:
    """The aiohttp arm: bench.bare_proxy in front of both fakes, pinned as cortex is."""
    p1, p2 = free_port(), free_port()
    argv = [sys.executable, "-m", "bench.bare_proxy"]
    argv += ["--route", f"{p1}={fake_url}", "--route", f"{p2}={token_url}"]
    proc = procs.start("aiohttp", pinned(SERVER_CPU, argv))
    url, paced_url = f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"
    wait_http(url + "/health", procs, 30)
    wait_http(paced_url + "/health", procs, 30)
    return Arm(FLOOR, url, "bench", "bench", "paced", paced_url, (proc.pid,))


def _routed(curl: str, models: Sequence[str], procs: Procs) -> None:
    deadline = time.monotonic() + 30
    for model in models:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        while True:
            procs.check()
            status, answer = _post_status(curl + "/v1/chat/completions", body)
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"cortex never routed {model}: {status} {answer}")
            time.sleep(0.3)


def _post_status(url: str, body: dict[str, Any]) -> tuple[int, str]:
    """Status and start of the answer (a stream or JSON); 0 if nobody listens yet."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(300).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(300).decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def start_litellm(root: Path, procs: Procs, fake_url: str, token_url: str) -> Arm:
    exe = shutil.which("litellm") or str(Path(sys.executable).parent / "litellm")
    if not Path(exe).exists():
        raise RuntimeError("litellm not installed (pass --no-litellm)")
    port = free_port()
    entries = {
        "bench-json": f"{fake_url}/json/v1",
        "bench-sse": f"{fake_url}/sse/v1",
        "paced": f"{token_url}/v1",
    }
    lines = ["model_list:"]
    for name, base in entries.items():
        lines += [
            f"  - model_name: {name}",
            "    litellm_params:",
            f"      model: openai/{name}",
            f"      api_base: {base}",
            "      api_key: bench",
        ]
    # LiteLLM refuses to start without a master key; requests then carry it.
    lines += ["general_settings:", f"  master_key: {LITELLM_KEY}"]
    (root / "litellm.yaml").write_text("\n".join(lines) + "\n")
    env = {
        "HF_HUB_OFFLINE": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "NO_DOCS": "True",
    }
    os.environ.update(env)
    argv = [exe, "--config", str(root / "litellm.yaml"), "--host", "127.0.0.1"]
    p = procs.start("litellm", pinned(SERVER_CPU, [*argv, "--port", str(port)]))
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health/liveliness", procs, 120)
    pids = (p.pid, *descendants(p.pid)[1:])
    return Arm("litellm", url, "bench-json", "bench-sse", "paced", url, pids, LITELLM_KEY)


# -- load ------------------------------------------------------------------------------------

WRK_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
{extra}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


@attrs.frozen
class Cell:
    arm: str
    mode: str  # "json" | "sse"
    conc: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float  # the proxy's
    # Which repeat of the cell this is (cells the targets read run `--repeat` times).
    run: int = 0


Key = tuple[str, str, int]  # (arm, mode, concurrency)


def _cpu(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(p) for p in pids)


def run_wrk(root: Path, arm: Arm, mode: str, conc: int, duration: float, run: int = 0) -> Cell:
    body: dict[str, Any] = {
        "model": arm.json_model if mode == "json" else arm.sse_model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 32,
    }
    if mode == "sse":
        body["stream"] = True
    extra = 'wrk.headers["X-Bench-Stream"] = "1"\n' if mode == "sse" else ""
    if arm.auth:
        extra += f'wrk.headers["Authorization"] = "Bearer {arm.auth}"\n'
    script = root / f"wrk-{arm.name}-{mode}.lua"
    script.write_text(WRK_LUA.format(body=json.dumps(json.dumps(body)), extra=extra))
    wrk = shutil.which("wrk") or "/usr/bin/wrk"
    argv = [
        wrk,
        "-t1",
        f"-c{conc}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    before = _cpu(arm.pids)
    out = subprocess.run(
        pinned(CLIENT_CPU, [*argv, arm.url + "/v1/chat/completions"]),
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    cpu = _cpu(arm.pids) - before
    m = re.search(r"^BENCH (\d+) (\d+) (\d+) (\d+) (\d+)$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"wrk failed on {arm.name}: {out.stdout} {out.stderr}")
    n, dur_us, p50, p99, errors = (int(x) for x in m.groups())
    rps = n / (dur_us / 1e6)
    return Cell(arm.name, mode, conc, n, rps, p50 / 1e3, p99 / 1e3, errors, cpu, run)


@attrs.frozen
class Paced:
    arm: str
    streams: int
    frames: int
    wall_s: float
    ttft_p50_ms: float
    errors: int
    cpu_s: float
    run: int = 0

    @property
    def tok_s(self) -> float:
        return self.frames / self.wall_s if self.wall_s else 0.0


async def _paced(
    url: str, model: str, streams: int, auth: str, frames_s: float
) -> tuple[int, float, list[float], int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell a story."}],
        "stream": True,
    }
    connector = aiohttp.TCPConnector(limit=0)
    # A stream not done in twice its paced length (plus slack) counts as failed.
    timeout = aiohttp.ClientTimeout(total=2 * frames_s + 20)
    frames, ttfts, errors = 0, [], 0
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:

        async def one() -> None:
            nonlocal frames, errors
            start = time.perf_counter()
            first = True
            try:
                async with session.post(url + "/v1/chat/completions", json=body) as r:
                    if r.status != 200:
                        errors += 1
                        return
                    async for line in r.content:
                        if line.startswith(b"data: {") and b'"content"' in line:
                            frames += 1
                            if first:
                                ttfts.append(time.perf_counter() - start)
                                first = False
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        return frames, time.perf_counter() - start, ttfts, errors


def run_paced(arm: Arm, streams: int, frames_s: float, run: int = 0) -> Paced:
    before = _cpu(arm.pids)
    loop = new_event_loop()
    try:
        frames, wall, ttfts, errors = loop.run_until_complete(
            _paced(arm.paced_url, arm.paced_model, streams, arm.auth, frames_s)
        )
    finally:
        loop.close()
    cpu = _cpu(arm.pids) - before
    ttft = statistics.median(ttfts) * 1e3 if ttfts else float("nan")
    return Paced(arm.name, streams, frames, wall, ttft, errors, cpu, run)


# -- report ---------------------------------------------------------------------------------


def report(cells: Sequence[Cell], paced: Sequence[Paced], sse_frames: int) -> str:
    """The tables (a figure measured in several runs shows its median) and the targets."""
    runs = by_runs(cells)
    by = {k: median_cell(v) for k, v in runs.items()}
    arms = list(dict.fromkeys(p.arm for p in paced))
    paced_med = [median_paced([p for p in paced if p.arm == a]) for a in arms]
    out = [*_runs_note(runs, paced), *_wrk_table(by), "", *_paced_table(paced_med), ""]
    # Per frame, from the canned runs: (CPU per streamed request - per JSON one) / frames.
    per_arm = ((arm, _marginal(by, arm, sse_frames)) for arm in ARMS[1:])
    marginal = [(arm, per) for arm, per in per_arm if per is not None]
    if marginal:
        out.append(f"Marginal proxy CPU per SSE frame, (sse - json) / {sse_frames} at c=32, µs:")
        out += [f"- {arm}: {per:.1f}" for arm, per in marginal]
        out.append("")
    out += [*_floor_table(by, paced_med, sse_frames), "", *targets(runs, paced)]
    return "\n".join(out)


def by_runs(cells: Sequence[Cell]) -> dict[Key, list[Cell]]:
    """Each (arm, mode, c)'s runs, in run order."""
    out: dict[Key, list[Cell]] = {}
    for c in sorted(cells, key=lambda c: c.run):
        out.setdefault((c.arm, c.mode, c.conc), []).append(c)
    return out


def median_cell(runs: Sequence[Cell]) -> Cell:
    """One row for a cell's runs: each figure the median over them (the CPU so that
    CPU per request is the median CPU per request), errors the most any run had."""
    if len(runs) == 1:
        return runs[0]
    med = statistics.median
    requests = round(med(c.requests for c in runs))
    per_req = med(c.cpu_s / c.requests if c.requests else 0.0 for c in runs)
    first = runs[0]
    return Cell(
        first.arm,
        first.mode,
        first.conc,
        requests,
        med(c.rps for c in runs),
        med(c.p50_ms for c in runs),
        med(c.p99_ms for c in runs),
        max(c.errors for c in runs),
        per_req * requests,
    )


def median_paced(runs: Sequence[Paced]) -> Paced:
    """One row for an arm's paced runs, as median_cell: median tok/s, CPU per frame, TTFT."""
    if len(runs) == 1:
        return runs[0]
    med = statistics.median
    frames = round(med(p.frames for p in runs))
    tok_s = med(p.tok_s for p in runs)
    per_frame = med(p.cpu_s / p.frames if p.frames else 0.0 for p in runs)
    first = runs[0]
    return Paced(
        first.arm,
        first.streams,
        frames,
        frames / tok_s if tok_s else 0.0,
        med(p.ttft_p50_ms for p in runs),
        max(p.errors for p in runs),
        per_frame * frames,
    )


def _runs_note(runs: dict[Key, list[Cell]], paced: Sequence[Paced]) -> list[str]:
    repeated = sorted({len(v) for v in runs.values() if len(v) > 1})
    paced_n = max((p.run + 1 for p in paced), default=1)
    if not repeated and paced_n == 1:
        return []
    parts = []
    if repeated:
        parts.append(f"the wrk cells the targets read ran {'/'.join(map(str, repeated))} times")
    if paced_n > 1:
        once = " (LiteLLM's once)" if any(p.arm == "litellm" for p in paced) else ""
        parts.append(f"the paced streams {paced_n} times{once}")
    return [f"Repeats: {' and '.join(parts)}; their rows show the median of each figure.", ""]


def _cpu_per_req(c: Cell) -> float:
    return c.cpu_s / c.requests * 1e6 if c.requests and c.arm != "direct" else 0.0


def _cpu_per_frame(p: Paced) -> float:
    return p.cpu_s / p.frames * 1e6 if p.frames and p.arm != "direct" else 0.0


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "-"


def _wrk_table(by: dict[tuple[str, str, int], Cell]) -> list[str]:
    out = [
        "| mode | c | arm | req/s | p50 ms | p99 ms | +p50 ms | +p99 ms | proxy CPU µs/req"
        " | req/s vs direct | req/s vs aiohttp | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("json", "sse"):
        for conc in sorted({k[2] for k in by}):
            d, f = by.get(("direct", mode, conc)), by.get((FLOOR, mode, conc))
            for arm in ARMS:
                c = by.get((arm, mode, conc))
                if c is None or d is None:
                    continue
                out.append(
                    f"| {mode} | {conc} | {arm} | {c.rps:,.0f} | {c.p50_ms:.3f} | {c.p99_ms:.3f}"
                    f" | {c.p50_ms - d.p50_ms:+.3f} | {c.p99_ms - d.p99_ms:+.3f}"
                    f" | {_cpu_per_req(c):,.0f} | {c.rps / d.rps:.3f}x"
                    f" | {_ratio(c.rps, f.rps) if f else '-'} | {c.errors} |"
                )
    return out


def _paced_table(paced: Sequence[Paced]) -> list[str]:
    out = [
        "Paced streams (bench.token_server, one frame per token):",
        "",
        "| arm | streams | tok/s | vs direct | TTFT p50 ms | proxy CPU µs/frame"
        " | µs/frame vs aiohttp | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pd = next((p for p in paced if p.arm == "direct"), None)
    pf = next((p for p in paced if p.arm == FLOOR), None)
    for p in paced:
        ratio = _ratio(p.tok_s, pd.tok_s) if pd else "-"
        per_frame = _cpu_per_frame(p)
        vs_floor = _ratio(per_frame, _cpu_per_frame(pf)) if pf and p.arm != "direct" else "-"
        out.append(
            f"| {p.arm} | {p.streams} | {p.tok_s:,.0f} | {ratio} | {p.ttft_p50_ms:.2f}"
            f" | {per_frame:.1f} | {vs_floor} | {p.errors} |"
        )
    return out


def _marginal(by: dict[tuple[str, str, int], Cell], arm: str, sse_frames: int) -> float | None:
    s, j = by.get((arm, "sse", 32)), by.get((arm, "json", 32))
    if s and j and s.requests and j.requests:
        return (s.cpu_s / s.requests - j.cpu_s / j.requests) / sse_frames * 1e6
    return None


def _floor_table(
    by: dict[tuple[str, str, int], Cell], paced: Sequence[Paced], sse_frames: int
) -> list[str]:
    """Each Python hop over the bare aiohttp proxy measured in the same run."""
    hops = [h for h in HOPS if any(k[0] == h for k in by) or any(p.arm == h for p in paced)]
    if not hops or not (any(k[0] == FLOOR for k in by) or any(p.arm == FLOOR for p in paced)):
        return []
    out = [
        "Against the framework floor (the aiohttp arm, bench.bare_proxy, same run):",
        "",
        "| figure | aiohttp | " + " | ".join(f"{h} | {h}/aiohttp" for h in hops) + " |",
        "|---|---|" + "---|---|" * len(hops),
    ]

    def row(name: str, fmt: str, values: dict[str, float | None]) -> None:
        floor = values.get(FLOOR)
        if floor is None:
            return
        cols = []
        for h in hops:
            v = values.get(h)
            cols += ["-", "-"] if v is None else [format(v, fmt), _ratio(v, floor)]
        out.append(f"| {name} | {format(floor, fmt)} | " + " | ".join(cols) + " |")

    arms = (FLOOR, *hops)
    for mode, conc in sorted({(k[1], k[2]) for k in by}, key=lambda x: (x[0] != "json", x[1])):
        cells = {a: c for a in arms if (c := by.get((a, mode, conc)))}
        row(f"{mode} c={conc} req/s", ",.0f", {a: c.rps for a, c in cells.items()})
        row(f"{mode} c={conc} CPU µs/req", ",.0f", {a: _cpu_per_req(c) for a, c in cells.items()})
    marginal = {a: _marginal(by, a, sse_frames) for a in arms}
    row(f"SSE CPU µs/frame, marginal at c=32 ({sse_frames} frames)", ".1f", marginal)
    runs = {p.arm: p for p in paced if p.arm in arms}
    row("paced tok/s", ",.0f", {a: p.tok_s for a, p in runs.items()})
    row("paced CPU µs/frame", ".1f", {a: _cpu_per_frame(p) for a, p in runs.items()})
    return out


# The wrk cells the targets below read: run `--repeat` times, the others once.
TARGET_CELLS: frozenset[Key] = frozenset(
    {
        ("direct", "json", 1),
        ("cortex", "json", 1),
        (FLOOR, "json", 32),
        ("cortex", "json", 32),
        ("neuron", "json", 32),
        ("litellm", "json", 32),
    }
)
NAN = float("nan")


def _per_req_us(c: Cell) -> float:
    return c.cpu_s / c.requests * 1e6 if c.requests else NAN


def _per_frame_us(p: Paced) -> float:
    return p.cpu_s / p.frames * 1e6 if p.frames else NAN


def _paired(a: Sequence[Any], b: Sequence[Any], f: Any) -> list[float]:
    """f(x, y) for the runs of `a` and `b` with the same run number (measured side by
    side), so that a ratio or a difference compares one moment of the machine."""
    ys = {y.run: y for y in b}
    return [f(x, ys[x.run]) for x in a if x.run in ys]


def _div(a: float, b: float) -> float:
    return a / b if b else NAN


def targets(runs: dict[Key, list[Cell]], paced: Sequence[Paced]) -> list[str]:
    """Issue 21's targets, each over its runs: median, margin, spread (bench.spread)."""

    def cells(arm: str, conc: int) -> list[Cell]:
        return runs.get((arm, "json", conc), [])

    def streams(arm: str) -> list[Paced]:
        return [p for p in paced if p.arm == arm]

    n = paced[0].streams if paced else 0
    checks: list[tuple[Target, list[float]]] = [
        (
            Target("cortex CPU/req non-streamed c=32", "<=", 250, "µs"),
            [_per_req_us(c) for c in cells("cortex", 32)],
        ),
        (
            Target("cortex req/s over aiohttp's non-streamed c=32", ">=", 0.8, "x", ".3f"),
            _paired(cells("cortex", 32), cells(FLOOR, 32), lambda x, y: _div(x.rps, y.rps)),
        ),
        (
            Target("cortex +p50 over direct non-streamed c=1", "<=", 0.3, "ms", ".3f"),
            _paired(cells("cortex", 1), cells("direct", 1), lambda x, y: x.p50_ms - y.p50_ms),
        ),
        (
            Target("cortex req/s over LiteLLM's non-streamed c=32", ">=", 60, "x", ".1f"),
            _paired(cells("cortex", 32), cells("litellm", 32), lambda x, y: _div(x.rps, y.rps)),
        ),
        *(
            (
                Target(f"{hop} CPU per paced frame", "<=", 30, "µs", ".1f"),
                [_per_frame_us(p) for p in streams(hop)],
            )
            for hop in HOPS
        ),
        (
            Target(f"{n} paced streams tok/s cortex/direct", ">=", 0.95, "x", ".3f", each=True),
            _paired(streams("cortex"), streams("direct"), lambda x, y: _div(x.tok_s, y.tok_s)),
        ),
        (
            Target("neuron CPU/req non-streamed c=32", "<=", 400, "µs"),
            [_per_req_us(c) for c in cells("neuron", 32)],
        ),
    ]
    lines = ["Targets (issue 21): the median over a figure's runs; spread = max - min."]
    verdicts = []
    for target, values in checks:
        line, verdict = spread.line_for(target, values)
        lines.append(line)
        verdicts.append(verdict)
    return [*lines, spread.summary(verdicts)]


def measure(
    root: Path, arms: Sequence[Arm], args: argparse.Namespace
) -> tuple[list[Cell], list[Paced]]:
    """wrk over every cell, then the paced streams; repeats interleaved across arms
    (run 2 of every repeated cell after run 1 of all) so paired runs sit side by side."""
    cells: list[Cell] = []
    for run in range(args.repeat):
        for mode in args.modes.split(","):
            for conc in (int(c) for c in args.conc.split(",")):
                for arm in arms:
                    if run and (arm.name, mode, conc) not in TARGET_CELLS:
                        continue
                    c = run_wrk(root, arm, mode, conc, args.duration, run)
                    cells.append(c)
                    print(
                        f"  {mode:4} c={conc:<3} {arm.name:8} {c.rps:9,.0f} req/s"
                        f"  p50 {c.p50_ms:8.3f} ms  p99 {c.p99_ms:8.3f} ms"
                        f"  errors {c.errors}  run {run + 1}",
                        flush=True,
                    )
    paced: list[Paced] = []
    for run in range(args.paced_runs):
        # LiteLLM's paced run takes ~20 s and no target reads it: once.
        for arm in (a for a in arms if not run or a.name != "litellm"):
            x = run_paced(arm, args.streams, args.frames / args.rate, run)
            paced.append(x)
            print(
                f"  paced {arm.name:8} {x.tok_s:9,.0f} tok/s  errors {x.errors}  run {run + 1}",
                flush=True,
            )
    return cells, paced


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gateway",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: make bench-gateway   (or: python -m bench.gateway --quick)",
    )
    p.add_argument("--duration", type=float, default=2.0, help="seconds per wrk run")
    p.add_argument("--streams", type=int, default=256, help="concurrent paced streams")
    p.add_argument("--rate", type=float, default=20.0, help="paced tokens/s per stream")
    p.add_argument("--frames", type=int, default=64, help="paced frames per stream")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 s runs, fewer streams")
    p.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM arm")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument(
        "--profile", type=Path, metavar="DIR", help="run cortex and neuron under pyinstrument"
    )
    p.add_argument(
        "--arms", default=",".join(ARMS), help="comma-separated arms to run (default: %(default)s)"
    )
    p.add_argument("--modes", default="json,sse", help="json, sse or both")
    p.add_argument("--conc", default=",".join(map(str, CONCURRENCY)), help="wrk connections")
    p.add_argument(
        "--repeat", type=int, help="runs of the wrk cells the targets read (default 3, quick 1)"
    )
    p.add_argument("--paced-runs", type=int, help="runs of the paced streams (default 3, quick 1)")
    args = p.parse_args(argv)
    only = set(args.arms.split(","))
    if args.quick:
        args.duration, args.streams, args.frames = 1.0, 32, 16
    default_runs = 1 if args.quick else 3
    args.repeat = max(1, args.repeat or default_runs)
    args.paced_runs = max(1, args.paced_runs or default_runs)
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"bench.gateway: {tool} not found (make sysdeps)", file=sys.stderr)
            return 2

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with workdir("bench-gateway-", args.keep) as root:
        procs = Procs(root)
        try:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            want_litellm = not args.no_litellm and "litellm" in only
            arms = start_all(root, procs, want_litellm, args.rate, args.frames, args.profile)
            arms = [a for a in arms if a.name in only or a.name == "direct"]
            print(f"arms up: {', '.join(a.name for a in arms)}", flush=True)
            cells, paced = measure(root, arms, args)
        except KeyboardInterrupt:
            return 130
        finally:
            procs.stop()
    table = report(cells, paced, SSE_FRAMES)
    print()
    print(table)
    if not args.no_write and not args.quick and only == set(ARMS):
        note = (
            "Servers pinned to CPU 0, wrk and the stream client to CPU 1; the fakes"
            " (nginx, bench.token_server) share CPU 0 with the proxy under test."
        )
        benchmarks_md.update("bench-gateway", "make bench-gateway", note + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
