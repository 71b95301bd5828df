"""The runner shim: `python -m neuron.runner_main [--neuron-model-id ID] <mlx_lm.server args>`.

A runner must never outlive its neuron, even a SIGKILLed one, so before
handing over to `mlx_lm.server` this process
  * asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and
  * watches a pipe inherited from the neuron (fd in NEURON_WATCHDOG_FD): the
    neuron holds the write end, so EOF means the neuron is gone, on Linux and
    macOS alike; then it kills its whole process group.
`--neuron-model-id` is only a marker for operators (`pgrep -f`); it is dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading

WATCHDOG_ENV = "NEURON_WATCHDOG_FD"
PARENT_ENV = "NEURON_PARENT_PID"
MODEL_ID_FLAG = "--neuron-model-id"
PR_SET_PDEATHSIG = 1


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


def main() -> None:
    _set_parent_death_signal()
    _start_watchdog()
    from mlx_lm import server

    sys.argv = ["mlx_lm.server", *strip_marker(sys.argv[1:])]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
