"""The runner shim: `python -m neuron.runner_main [--neuron-model-id ID] <mlx_lm.server args>`.

A runner must never outlive its neuron, even a SIGKILLed one, so before
handing over to `mlx_lm.server` this process
  * asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and
  * watches a pipe inherited from the neuron (fd in NEURON_WATCHDOG_FD): the
    neuron holds the write end, so EOF means the neuron is gone, on Linux and
    macOS alike; then it kills its whole process group.
`--neuron-model-id` is only a marker for operators (`pgrep -f`); it is dropped.

A pipeline rank also gets its layer counts (NEURON_PIPELINE_SPLIT, one per
rank): cortex placed the layers in proportion to each node's memory, while
mlx_lm's own loader would split them evenly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Any

WATCHDOG_ENV = "NEURON_WATCHDOG_FD"
PARENT_ENV = "NEURON_PARENT_PID"
MODEL_ID_FLAG = "--neuron-model-id"
PR_SET_PDEATHSIG = 1
SPLIT_ENV = "NEURON_PIPELINE_SPLIT"


def _die() -> None:
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(1)


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect.
    expected = os.environ.get(PARENT_ENV)
    if expected is not None and os.getppid() != int(expected):
        _die()


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            _die()


def _start_watchdog() -> None:
    raw = os.environ.get(WATCHDOG_ENV)
    if raw is None:
        return
    threading.Thread(target=_watch, args=(int(raw),), name="neuron-watchdog", daemon=True).start()


def strip_marker(argv: list[str]) -> list[str]:
    """Drop `--neuron-model-id ID` from a command line."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == MODEL_ID_FLAG:
            skip = True
        elif not arg.startswith(MODEL_ID_FLAG + "="):
            out.append(arg)
    return out


def apply_pipeline_split(raw: str | None) -> None:
    """Make mlx_lm's pipeline() default to these per-rank layer counts ("7,23")."""
    if not raw:
        return
    split = [int(x) for x in raw.split(",")]
    from mlx_lm.models.pipeline import PipelineMixin

    even = PipelineMixin.pipeline

    def pipeline(self: PipelineMixin, group: Any, split_: list[int] | None = None) -> Any:
        return even(self, group, split if split_ is None else split_)  # type: ignore[no-untyped-call]

    PipelineMixin.pipeline = pipeline  # type: ignore[method-assign]


def fingerprint() -> str:
    """`system_fingerprint` for every answer: the software, never the host.

    mlx_lm's own puts `platform.platform()` (kernel version, distribution) in
    every answer to every client.
    """
    import mlx_lm

    return f"mlx_lm-{mlx_lm.__version__}"


def main() -> None:
    _set_parent_death_signal()
    _start_watchdog()
    apply_pipeline_split(os.environ.get(SPLIT_ENV))
    from mlx_lm import server

    server.get_system_fingerprint = fingerprint
    sys.argv = ["mlx_lm.server", *strip_marker(sys.argv[1:])]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
