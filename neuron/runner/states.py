"""A local model's states, and the one table of the changes allowed between them.

    loading -> warming -> ready -> (crash, broken) recovering -> ready ...
                            ready <-> stalled -> (killed) recovering -> ready ...
       \\--------------------------> recovering      (lost before it was ready)
    loading, warming, ready, stalled, recovering -> failed  (gave up: no restart)
    any -> unloading                                 (then the record is gone)

`stalled` is a runner that missed its heartbeat (its process stopped, or its
/health unanswered): not routable; it is ready again if it answers before
`stall_timeout_s`, else killed.  `loading -> ready` is a rank of a group other
than 0 (it serves no HTTP, so it has no warmup).  Every change goes through
`ModelSupervisor._transition`, which checks it here (as llama-swap checks its
process states): a change the table does not hold is a bug, raised as
BadTransition.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.wire import ModelState

TRANSITIONS: Mapping[ModelState, frozenset[ModelState]] = {
    "loading": frozenset({"warming", "ready", "recovering", "failed", "unloading"}),
    "warming": frozenset({"ready", "recovering", "failed", "unloading"}),
    "ready": frozenset({"stalled", "recovering", "failed", "unloading"}),
    "stalled": frozenset({"ready", "recovering", "failed", "unloading"}),
    "recovering": frozenset({"ready", "failed", "unloading"}),
    # A failed record stays for operators to read; only an unload (or a new load) ends it.
    "failed": frozenset({"unloading"}),
    "unloading": frozenset(),
}

# States in which a model's load has ended: a new load of it starts afresh,
# any other state is a load under way or done that a new one joins.
ENDED: frozenset[ModelState] = frozenset({"failed", "unloading"})


class BadTransition(RuntimeError):
    """A state change the table does not allow: a bug in the supervisor."""


def check_transition(frm: ModelState, to: ModelState) -> None:
    """Raise BadTransition unless the table allows `frm -> to`."""
    if to not in TRANSITIONS[frm]:
        raise BadTransition(f"no transition {frm} -> {to}")
