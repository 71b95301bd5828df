"""One rank of a link test: `python -m neuron.runner.linktest_main --sizes 1024,... --rounds N`.

Started by a neuron (POST /linktest) with the same environment a runner
group's rank gets (MLX_RANK, MLX_HOSTFILE or MLX_JACCL_COORDINATOR and
MLX_IBV_DEVICES). It joins the group, warms each size up, then times
`mx.distributed.all_sum` of a float32 array of each size, round by round, and
prints one JSON line per event as it goes (flushed), so the neuron can report
the rounds done even when a later one never returns (a lost peer spins).

  {"event": "joined", "rank": r, "world_size": n, "join_s": t}
  {"event": "round", "size": bytes, "round": i, "seconds": t, "ok": bool, "error": str|null}
  {"event": "done"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from neuron.runner.main import set_parent_death_signal, start_watchdog


def _emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def parse_sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="neuron.runner.linktest_main")
    p.add_argument("--backend", choices=["ring", "jaccl"], default="ring")
    p.add_argument("--sizes", type=parse_sizes, required=True, help="bytes, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    # Never outlive the neuron (the same guards a runner has).
    set_parent_death_signal()
    start_watchdog()

    import mlx.core as mx

    t0 = time.perf_counter()
    group = mx.distributed.init(strict=True, backend=args.backend)
    world = group.size()
    # A first tiny all-reduce: every rank has joined once it returns.
    mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
    _emit(event="joined", rank=group.rank(), world_size=world, join_s=time.perf_counter() - t0)
    for size in args.sizes:
        x = mx.ones(max(1, size // 4), dtype=mx.float32)
        mx.eval(x)
        for _ in range(args.warmup):
            mx.eval(mx.distributed.all_sum(x, group=group))
        for i in range(args.rounds):
            start = time.perf_counter()
            y = mx.distributed.all_sum(x, group=group)
            mx.eval(y)
            took = time.perf_counter() - start
            # Every element must be the world size: a wrong sum is a failed round.
            lo, hi = mx.min(y).item(), mx.max(y).item()
            ok = lo == hi == float(world)
            error = None if ok else f"all_sum gave values in [{lo}, {hi}], expected {world}"
            _emit(event="round", size=size, round=i, seconds=took, ok=ok, error=error)
    _emit(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
