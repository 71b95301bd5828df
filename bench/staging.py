"""Peer-to-peer staging against `cp` of the same bytes, in one run.

`python -m bench.staging [--mb 1536]`

Two neurons on loopback: a peer holding a copy of the demo model with one extra
file of `--mb` random megabytes, and a node that stages it from that peer
(POST /store/stage with `peers`). Prints the staging rate, the CPU the serving
neuron spent, `cp` of the same file, the ratio, and whether the staged copy is
byte-identical. The peer hashes its copy once for its manifest before the timed
transfer (it caches it next to the copy), as it would for any later stage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import cpu_seconds
from neuron.store.demo_model import build_demo_model
from tests.conftest import NeuronProcess, http_json, stop_quietly, wait_until

NAME = "bench--big"  # the store's name for the hub id "bench/big"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.staging", description=__doc__)
    p.add_argument("--mb", type=int, default=1536, help="size of the extra file, MiB")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-staging-"))
    started: list[NeuronProcess] = []
    try:
        copy = root / "peer" / "store" / "models" / NAME
        shutil.copytree(build_demo_model(root / "demo"), copy)
        size = args.mb << 20
        with (copy / "big.safetensors").open("wb") as f:
            for _ in range(size // (16 << 20)):
                f.write(os.urandom(16 << 20))
        settings = {"min_free_gb": 0, "model_roots": [str(root)]}
        peer = NeuronProcess.start(root / "peer", settings)
        started.append(peer)
        node = NeuronProcess.start(root / "node", settings)
        started.append(node)
        t = time.monotonic()
        http_json(peer.url + f"/store/models/{NAME}/manifest", timeout=600)
        print(f"manifest (hashed once, cached): {time.monotonic() - t:.2f} s")
        c0, t0 = cpu_seconds(peer.process.pid), time.monotonic()
        stage = {"model_id": "big", "source": "bench/big", "peers": [peer.url]}
        status, body = http_json(node.url + "/store/stage", stage)
        if status >= 400:
            print(f"stage refused: {status} {body}")
            return 1

        def done() -> bool:
            _, s = http_json(node.url + "/store/storage")
            return any(c["name"] == NAME for c in s["staged"]) or any(
                j["state"] == "failed" for j in s["staging"]
            )

        wait_until(done, 900, "the stage")
        took, cpu = time.monotonic() - t0, cpu_seconds(peer.process.pid) - c0
        total = sum(f.stat().st_size for f in copy.iterdir() if f.is_file())
        for n in started:
            stop_quietly(n)
        subprocess.run(["sync"], check=False)
        t0 = time.monotonic()
        subprocess.run(["cp", str(copy / "big.safetensors"), str(root / "cp.bin")], check=True)
        cp_s = time.monotonic() - t0
        staged = root / "node" / "store" / "models" / NAME / "big.safetensors"
        same = subprocess.run(["cmp", "-s", str(copy / "big.safetensors"), str(staged)]).returncode
        rate, cp_rate = total / took / 1e6, size / cp_s / 1e6
        print(f"peer stage  {total / 1e6:7.0f} MB in {took:6.2f} s  {rate:6.0f} MB/s")
        print(f"cp          {size / 1e6:7.0f} MB in {cp_s:6.2f} s  {cp_rate:6.0f} MB/s")
        print(f"stage / cp  {rate / cp_rate:.2f}x")
        print(f"serving neuron CPU {cpu:.2f} s ({100 * cpu / took:.0f}% of one core)")
        print(f"byte-identical: {same == 0}")
        return 0 if same == 0 else 1
    finally:
        for n in started:
            stop_quietly(n)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
