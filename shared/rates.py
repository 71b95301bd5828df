"""Token rates only over a real interval.

A rate over a near-zero time is noise: two frames read in one socket read give
"27,925.8 tok/s". A decode rate is computed only over at least MIN_RATE_SPAN_S
and MIN_RATE_TOKENS tokens; otherwise there is none (None, shown as NO_RATE).
"""

from __future__ import annotations

MIN_RATE_SPAN_S = 0.1
MIN_RATE_TOKENS = 2
# What a table or trace prints where there is no rate.
NO_RATE = "\u2013"  # an en dash, as the runbooks print a missing figure


def rate(tokens: int | None, seconds: float | None, ndigits: int | None = 2) -> float | None:
    """`tokens / seconds`, or None unless `tokens` >= MIN_RATE_TOKENS over at least
    MIN_RATE_SPAN_S seconds."""
    if tokens is None or seconds is None:
        return None
    if tokens < MIN_RATE_TOKENS or not seconds >= MIN_RATE_SPAN_S:
        return None
    value = tokens / seconds
    return value if ndigits is None else round(value, ndigits)


def decode_rate(
    completion: int | None, first_at: float | None, last_at: float | None
) -> float | None:
    """Tokens after the first over the time from the first to the last: decode speed."""
    if completion is None or first_at is None or last_at is None:
        return None
    return rate(completion - 1, last_at - first_at)
