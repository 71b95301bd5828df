"""What the proxy saw of one model's runner, and the verdicts drawn from it alone.

The proxy reports (`started`, `byte`, `first_token`, `ended`, `used`, `tokens`,
`done`, `failed` with a kind), and the supervisor's heartbeat what it saw of the
process (`beat`); this record keeps the traffic figures that /health shows and
alone decides whether the runner is broken (a dead generation thread, or failed
requests in a row), stalled (it missed a heartbeat) or to be killed (stalled for
`stall_timeout_s`, or a group's rank 0 silent with work in flight for
`group_stall_timeout_s`).  No I/O: the decisions are tested as tables.
"""

from __future__ import annotations

import time
from typing import Literal

import attrs

from neuron.config import RunnerConfig
from shared.wire import Phase

# What mlx_lm.server answers once its generation thread has died: it never recovers.
BROKEN_MARK = "generation thread died"

# How a request failed, as the proxy (or the supervisor's /health read) saw it:
#   thread_died   the runner says its generation thread died: broken at once
#   refused       400/404, the request's own doing (a chat template refusing its roles)
#   error_answer  any other error status
#   connection    its HTTP side failed us
#   cut_short     it closed a stream before [DONE]
FailureKind = Literal["thread_died", "refused", "error_answer", "connection", "cut_short"]

# What one heartbeat saw: the process stopped (SIGSTOP, a debugger), its /health
# unanswered within the probe timeout, or a sign of life.
Pulse = Literal["stopped", "silent", "alive"]
# The verdict of a heartbeat: go on serving, stop routing to it (stalled), take it
# back (revived), or kill it.
Beat = Literal["alive", "stalled", "revived", "kill"]


def answer_kind(status: int, message: str) -> FailureKind:
    """The kind of failure an error answer (status >= 400) from the runner is."""
    if BROKEN_MARK in message:
        return "thread_died"
    # mlx_lm.server answers 404 to any failure to start a generation: past the
    # allow-list that is the request's doing, so neither counted nor retried.
    if status in (400, 404):
        return "refused"
    return "error_answer"


@attrs.define
class RunnerHealth:
    """One model's runner as its requests saw it (kept across restarts but for its verdicts)."""

    max_failures: int = 3
    # Stalled this long: killed.
    stall_after_s: float = 2.5
    # A group's rank 0 silent with work in flight this long: hung.
    group_stall_after_s: float = 8.0
    prefilling: int = 0
    decoding: int = 0
    ttft_s: float | None = None
    decode_tps: float | None = None
    completion_tokens: int = 0
    last_used: float = attrs.Factory(time.time)
    # time.monotonic() of the last byte from the runner (or of a request's start
    # on an idle runner): the stall watchdog measures silence from it.
    last_byte_at: float = attrs.Factory(time.monotonic)
    # Failed requests in a row, and the verdict "broken" (its reason) once drawn.
    failures: int = 0
    broken: str | None = None
    # time.monotonic() of the heartbeat that first found it stalled; None while it is not.
    stalled_since: float | None = None
    # What that heartbeat saw, for the reason given when it is killed.
    stalled_by: Pulse = "alive"

    @classmethod
    def create(cls, config: RunnerConfig) -> RunnerHealth:
        return cls(
            max_failures=config.max_consecutive_errors,
            stall_after_s=config.stall_timeout_s,
            group_stall_after_s=config.group_stall_timeout_s,
        )

    @property
    def phase(self) -> Phase:
        if self.prefilling:
            return "prefill"
        if self.decoding:
            return "decode"
        return "idle"

    # --- what the proxy saw ---------------------------------------------------

    def started(self, now: float) -> None:
        """A request went to the runner (it prefills until its first token)."""
        # An idle runner's silence counts for the stall watchdog from now on; a busy
        # one's keeps counting from its last byte (new requests do not hide a stall).
        if self.phase == "idle":
            self.last_byte_at = now
        self.prefilling += 1

    def byte(self, now: float) -> None:
        """Bytes came from the runner (called per chunk: keep it this small)."""
        self.last_byte_at = now

    def first_token(self, ttft_s: float) -> None:
        """A request's first token: from prefill to decode."""
        self.prefilling -= 1
        self.decoding += 1
        self.ttft_s = ttft_s

    def ended(self, decoding: bool) -> None:
        """A request left the runner, in decode or (if it never had a token) in prefill."""
        if decoding:
            self.decoding -= 1
        else:
            self.prefilling -= 1

    def used(self, wall: float) -> None:
        """A client's use (not a probe's): the idle unload counts from it."""
        self.last_used = wall

    def tokens(self, completion: int, decode_tps: float | None) -> None:
        self.completion_tokens += completion
        if decode_tps is not None:
            self.decode_tps = decode_tps

    def done(self) -> None:
        """A request answered in full: the failures in a row are over."""
        self.failures = 0

    def failed(self, kind: FailureKind, detail: str, *, alive: bool = True) -> str | None:
        """One failed request: the reason the runner is broken because of it, or None."""
        if kind == "refused":
            return None
        if kind == "thread_died":
            return detail
        if kind == "connection" and not alive:
            return None  # a dead runner's HTTP fails: its crash says why already
        self.failures += 1
        if self.failures < self.max_failures:
            return None
        return f"{self.failures} failed requests in a row; last: {detail}"

    # --- verdicts -------------------------------------------------------------

    def broke(self, reason: str) -> bool:
        """Record the verdict "broken"; False if one was already drawn (the first one stands)."""
        if self.broken is not None:
            return False
        self.broken = reason
        return True

    def beat(self, now: float, pulse: Pulse) -> Beat:
        """One heartbeat's verdict: a runner that misses one is stalled at once, and
        killed once it has stayed stalled for `stall_after_s`."""
        if pulse == "alive":
            was_stalled = self.stalled_since is not None
            self.stalled_since = None
            return "revived" if was_stalled else "alive"
        if self.stalled_since is None:
            self.stalled_since, self.stalled_by = now, pulse
            return "stalled"
        return "kill" if now - self.stalled_since >= self.stall_after_s else "stalled"

    def stall_reason(self, now: float) -> str:
        """Why a stalled runner is killed (after `beat` said "kill")."""
        since = 0.0 if self.stalled_since is None else now - self.stalled_since
        what = (
            "its process is stopped"
            if self.stalled_by == "stopped"
            else "its /health goes unanswered"
        )
        return f"runner stalled: {what} ({since:.1f} s)"

    def hung_s(self, now: float, in_flight: int) -> float | None:
        """A group's rank 0: how long it has been silent with work in flight, once past
        `group_stall_after_s` (a rank hung on a collective); else None."""
        silent = now - self.last_byte_at
        if in_flight and silent > self.group_stall_after_s:
            return silent
        return None

    def renew(self) -> None:
        """A new runner: the old one's verdicts and failures go with it."""
        self.broken = None
        self.failures = 0
        self.stalled_since = None
