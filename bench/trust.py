"""What a client pays when things go wrong: the figures behind the trust issue.

`python -m bench.trust [--streams N]`

Starts two neurons and a cortex with default timeouts (the demo model on both,
`replicas = 2`), then measures, one after another:

  partition, stream      SIGSTOP the neuron serving a stream: seconds until the
                         client's stream ends (error frame, [DONE])
  partition, non-stream  SIGSTOP the neuron serving a one-piece answer: seconds
                         until the client gets an answer or an error
  frozen runner, stream  SIGSTOP the runner (not the neuron) serving a stream
  abandoned              a client leaves a long non-streamed request (and a long
                         streamed one): the runners' CPU, as a share of one core,
                         2-5 s after it left
  metrics                N streams read to [DONE] by clients that close at once:
                         the share cortex counts as anything but 200

Each case waits at most --cap seconds. Nothing here is an assertion; the tests
bound the same things generously. Everything started is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import attrs

from bench.common import Procs, cpu_seconds, free_port, wait_http
from neuron.config import NeuronConfig
from shared.blocking_http import request_json

MODEL = "demo"
# (So the same bench runs against a checkout from before model_roots existed.)
_HAS_ROOTS = "model_roots" in attrs.fields_dict(NeuronConfig)
# Random weights may end a stream at any step: ban the end-of-text token (id 1).
LONG = {"max_tokens": 100000, "logit_bias": {"1": -100}}


def start_fleet(root: Path, procs: Procs, model_dir: Path) -> tuple[str, dict[str, Any]]:
    (root / "logs").mkdir()
    neurons: dict[str, Any] = {}
    for name in ("a", "b"):
        port = free_port()
        cfg = root / f"{name}.toml"
        roots = f'model_roots = ["{model_dir.parent}"]\n' if _HAS_ROOTS else ""
        cfg.write_text(f'port = {port}\nstore_dir = "{root / name}"\nnode_name = "{name}"\n{roots}')
        p = procs.start(name, [sys.executable, "-m", "neuron.cli", "serve", "-c", str(cfg)])
        neurons[name] = (f"http://127.0.0.1:{port}", p)
    (root / "models.toml").write_text(
        f'[[models]]\nid = "{MODEL}"\nsource = "{model_dir}"\nreplicas = 2\nkeep_loaded = true\n'
    )
    port = free_port()
    urls = "".join(f'[[neurons]]\nname = "{n}"\nurl = "{u}"\n' for n, (u, _) in neurons.items())
    (root / "cortex.toml").write_text(f'port = {port}\ncatalogue = "models.toml"\n{urls}')
    procs.start(
        "cortex", [sys.executable, "-m", "cortex.cli", "serve", "-c", str(root / "cortex.toml")]
    )
    cortex = f"http://127.0.0.1:{port}"
    for u, _ in neurons.values():
        wait_http(u + "/health", procs, 60)
    wait_http(cortex + "/health", procs, 60)
    return cortex, neurons


def ready_everywhere(cortex: str, procs: Procs, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        _, body, _ = request_json("GET", cortex + "/v1/models")
        entry = next((m for m in body.get("data", []) if m["id"] == MODEL), None)
        ready = [x for x in (entry or {}).get("locations", []) if x["state"] == "ready"]
        if len(ready) == 2 and all(x["healthy"] for x in ready):
            return
        time.sleep(0.5)
    raise RuntimeError("the model is not ready on both nodes")


def busy_node(neurons: dict[str, Any]) -> str | None:
    for name, (url, _) in neurons.items():
        with contextlib.suppress(OSError):
            _, h, _ = request_json("GET", url + "/health", timeout=1.0)
            if any(m.get("in_flight") for m in h.get("models", [])):
                return name
    return None


def runner_cpu(root: Path) -> float:
    """CPU seconds so far of every runner started under `root`."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes()
            if b"neuron.runner.main" in cmd and str(root).encode() in cmd:
                total += cpu_seconds(int(entry.name))
    return total


def runner_of(neuron_pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == neuron_pid and b"neuron.runner.main" in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


async def partition(
    cortex: str, neurons: dict[str, Any], stream: bool, cap: float, *, runner: bool = False
) -> str:
    body = {"model": MODEL, "prompt": "once upon a time", "stream": stream, **LONG}
    alone = ""
    async with aiohttp.ClientSession() as s:
        if not stream:
            # What the same answer takes on a healthy fleet, to tell the two apart.
            t0 = time.monotonic()
            async with s.post(cortex + "/v1/completions", json=body) as r:
                await r.read()
            alone = f"; {time.monotonic() - t0:.1f} s on a healthy fleet"
        req = asyncio.ensure_future(s.post(cortex + "/v1/completions", json=body))
        resp = None
        if stream:
            resp = await req
            await resp.content.readany()
        victim = None
        for _ in range(50):
            victim = busy_node(neurons)
            if victim:
                break
            await asyncio.sleep(0.1)
        if victim is None:
            return "no node was busy"
        pid = neurons[victim][1].pid
        if runner:
            pid = runner_of(pid) or pid
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(cap):
                if resp is None:
                    resp = await req
                    await resp.read()
                    what = f"HTTP {resp.status}"
                else:
                    tail = b""
                    while chunk := await resp.content.readany():
                        tail = (tail + chunk)[-2000:]
                    what = "error frame" if b'"error"' in tail else "ended"
        except TimeoutError:
            what = "still waiting"
        except aiohttp.ClientError as exc:
            what = type(exc).__name__
        finally:
            took = time.monotonic() - t0
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
            if resp is not None:
                resp.close()
            req.cancel()
        who = f"the runner on {victim}" if runner else f"node {victim}"
        return f"{took:6.1f} s  ({what}; {who} stopped{alone})"


async def abandoned(cortex: str, root: Path, stream: bool, prompt: str) -> str:
    body = {"model": MODEL, "prompt": prompt, "stream": stream, **LONG}
    async with aiohttp.ClientSession() as s:
        req = asyncio.ensure_future(s.post(cortex + "/v1/completions", json=body))
        await asyncio.sleep(1.5)
        req.cancel()
        with contextlib.suppress(BaseException):
            (await req).close()
    await asyncio.sleep(2.0)
    c0, t0 = runner_cpu(root), time.monotonic()
    await asyncio.sleep(3.0)
    share = (runner_cpu(root) - c0) / (time.monotonic() - t0)
    await asyncio.sleep(1.0)
    return f"{100 * share:5.0f} % of a core"


async def metrics_truth(cortex: str, n: int) -> str:
    body = {"model": MODEL, "prompt": "hi", "stream": True, "max_tokens": 8}
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        _, before = _codes(await _metrics(s, cortex))
        for _ in range(n):
            resp = await s.post(cortex + "/v1/completions", json=body)
            buf = b""
            while b"[DONE]" not in buf:
                chunk = await resp.content.readany()
                if not chunk:
                    break
                buf += chunk
            resp.close()  # at once, as many clients do
        await asyncio.sleep(1.0)
        _, after = _codes(await _metrics(s, cortex))
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    other = sum(v for k, v in diff.items() if k != "200")
    return f"{100 * other / n:5.1f} % not 200  ({ {k: v for k, v in diff.items() if v} })"


async def _metrics(s: aiohttp.ClientSession, cortex: str) -> str:
    async with s.get(cortex + "/metrics") as r:
        return await r.text()


def _codes(text: str) -> tuple[None, dict[str, float]]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cortex_requests_total{") and f'model="{MODEL}"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            out[code] = out.get(code, 0) + float(line.rsplit(" ", 1)[1])
    return None, out


async def run(cortex: str, neurons: dict[str, Any], root: Path, procs: Procs, args: Any) -> None:
    rows = []
    for stream in (True, False):
        ready_everywhere(cortex, procs)
        rows.append(
            (
                f"partition, {'stream' if stream else 'non-stream'}",
                await partition(cortex, neurons, stream, args.cap),
            )
        )
    ready_everywhere(cortex, procs)
    rows.append(
        ("frozen runner, stream", await partition(cortex, neurons, True, args.cap, runner=True))
    )
    ready_everywhere(cortex, procs)
    # Streamed first: an abandoned one-piece request that keeps running would
    # otherwise show in the streamed figure too.
    rows.append(("abandoned, stream decode", await abandoned(cortex, root, True, "hi")))
    rows.append(("abandoned, non-stream decode", await abandoned(cortex, root, False, "hi")))
    rows.append(("metrics, streams closed at [DONE]", await metrics_truth(cortex, args.streams)))
    for name, value in rows:
        print(f"{name:36s} {value}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.trust", description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=200, help="streams for the metrics case")
    p.add_argument("--cap", type=float, default=90.0, help="longest wait of one case, s")
    args = p.parse_args(argv)
    from neuron.store.demo_model import build_demo_model

    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp:
        root = Path(tmp)
        procs = Procs(root)
        try:
            model_dir = build_demo_model(root / "models" / "demo")
            cortex, neurons = start_fleet(root, procs, model_dir)
            asyncio.run(run(cortex, neurons, root, procs, args))
        finally:
            for _, p_ in procs.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p_.pid, signal.SIGCONT)
            procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
