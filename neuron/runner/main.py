"""The runner shim: `python -m neuron.runner.main [--neuron-model-id ID] <mlx_lm.server args>`.

A runner must never outlive its neuron, even a SIGKILLed one, so before
handing over to `mlx_lm.server` this process
  * asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG), and
  * watches a pipe inherited from the neuron (fd in NEURON_WATCHDOG_FD): the
    neuron holds the write end, so EOF means the neuron is gone, on Linux and
    macOS alike; then it kills its whole process group.
`--neuron-model-id` is only a marker for operators (`pgrep -f`); it is dropped.

mlx_lm.server's generation loop looks at its request queue only after a time
budget of 0.5 s of batch steps, or once its batch has drained: a request that
arrives a millisecond after the batch began waits for the whole batch to finish
(bench: a request sent 20 ms after another got its first token only with the
other's last, 562 vs 54 ms). Every proxy staggers arrivals a little, so the
shim cuts that budget to about one step (ADMIT_EVERY_S); distributed groups keep
mlx_lm's own (there it sizes the run of steps between collectives).

A pipeline rank also gets its layer counts (NEURON_PIPELINE_SPLIT, one per
rank): cortex placed the layers in proportion to each node's memory, while
mlx_lm's own loader would split them evenly.

Structured output and forced tool calls are enforced here too, by a logits
processor built from each request's grammar (neuron.runner.constrained).
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
# How long the runner's generation loop runs batch steps before it admits new requests.
ADMIT_EVERY_S = 0.001


def _die() -> None:
    with contextlib.suppress(OSError):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(1)


def set_parent_death_signal() -> None:
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


def start_watchdog() -> None:
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


def admit_promptly(server: Any, every_s: float = ADMIT_EVERY_S) -> None:
    """Make mlx_lm.server's loop admit queued requests after `every_s` of steps.

    At least one step runs per look at the queue (the budget is checked before
    each step), so a long budget only delays requests that arrive mid-batch.
    """
    base = server.TimeBudget

    class PromptBudget(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not self._is_distributed:  # there the budget sizes steps between collectives
                self._budget = every_s

    server.TimeBudget = PromptBudget


def fingerprint() -> str:
    """`system_fingerprint` for every answer: the software, never the host.

    mlx_lm's own puts `platform.platform()` (kernel version, distribution) in
    every answer to every client.
    """
    import mlx_lm

    return f"mlx_lm-{mlx_lm.__version__}"


def quiet_health(server: Any) -> None:
    """No access-log line for GET /health: the neuron's heartbeat asks every second, and
    a line each would fill the runner's log (about 5 MB a day); other requests keep
    theirs."""
    handler = server.APIHandler
    base = handler.log_request

    def log_request(self: Any, code: Any = "-", size: Any = "-") -> None:
        if getattr(self, "path", None) != "/health":
            base(self, code, size)

    handler.log_request = log_request


def main() -> None:
    set_parent_death_signal()
    start_watchdog()
    apply_pipeline_split(os.environ.get(SPLIT_ENV))
    from mlx_lm import server

    from neuron.runner import constrained, stops

    admit_promptly(server)
    quiet_health(server)
    constrained.install(server)
    stops.install(server)  # which stop sequence ended an answer (Anthropic's stop_reason)

    server.get_system_fingerprint = fingerprint
    sys.argv = ["mlx_lm.server", *strip_marker(sys.argv[1:])]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
