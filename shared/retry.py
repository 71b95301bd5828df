"""Every retry policy of the project, named, in one place (tenacity).

One is not here: cortex trying a request on another replica before its first
byte (`retry_attempts`, no wait) is a plain loop in cortex.http.proxy, since a
tenacity round per request cost more than the first attempt's own routing.
"""

from __future__ import annotations

import tenacity

# A runner that crashed: restart after 1, 2, 4 ... seconds, capped at 30.
RUNNER_RESTART_WAIT = tenacity.wait_exponential(multiplier=1, min=1, max=30)


# A failed load of a model (by a request or by the reconciler): no new load before
# this many units of `load_backoff_s` (1, 2, 4 ... 60), so a model that cannot
# load does not thrash the fleet; requests meanwhile get 503 cold_load_failed.
LOAD_RETRY_WAIT = tenacity.wait_exponential(multiplier=1, min=1, max=60)


def backoff_s(wait: tenacity.wait.wait_base, attempt: int) -> float:
    """Seconds a named wait policy gives before attempt `attempt` + 1.

    For loops that are not one call retried (the reconciler's periodic pass, the
    runner restart loop counting only the crashes inside its window) but
    should still back off by the same named policy.
    """
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait(state))
