"""One-time join codes: minted by an admin, redeemed once by a new neuron for the fleet token.

Cortex keeps only each code's SHA-256 and its life (minted, expires, used), in
memory: a restart voids every code outstanding, which costs an operator one
more `cortex join-code` and keeps nothing secret on disk. A record stays past
its expiry for one more TTL, so a late redemption is told "expired" or "used"
rather than "unknown", then it is forgotten.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Literal

import attrs

# 20 base32 characters (100 bits), in groups of 5: typed by hand, never guessed.
_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O or 1/I to misread
_GROUPS, _GROUP = 4, 5
Refusal = Literal["unknown", "expired", "used"]


@attrs.frozen
class _Code:
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None


class JoinRefused(Exception):
    """A code that does not admit: unknown (or mistyped), expired, or used already."""

    def __init__(self, why: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.why = why


def normal(code: str) -> str:
    """A code as typed (any case, with or without dashes or spaces) as minted."""
    return "".join(c for c in code.upper() if c.isalnum())


def _digest(code: str) -> bytes:
    return hashlib.sha256(normal(code).encode()).digest()


@attrs.define
class JoinCodes:
    """The codes minted and not yet forgotten, by hash; `clock` is monotonic seconds."""

    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _codes: dict[bytes, _Code] = attrs.field(factory=dict, init=False)

    def mint(self, ttl_s: float | None = None) -> tuple[str, float]:
        """A new code and its life in seconds (at most the configured TTL)."""
        life = self.ttl_s if ttl_s is None else min(ttl_s, self.ttl_s)
        if life <= 0:
            raise ValueError("a join code's ttl must be > 0")
        self._forget_old()
        raw = "".join(secrets.choice(_ALPHABET) for _ in range(_GROUPS * _GROUP))
        self._codes[_digest(raw)] = _Code(expires_at=self.clock() + life)
        code = "-".join(raw[i : i + _GROUP] for i in range(0, len(raw), _GROUP))
        return code, life

    def redeem(self, code: str, by: str) -> None:
        """Use `code` up (JoinRefused if it does not admit); `by` names who, for the log."""
        now = self.clock()
        self._forget_old()
        digest = _digest(code)
        # Compared in constant time against every record: no timing hint of a near miss.
        found = None
        for key in self._codes:
            if hmac.compare_digest(key, digest):
                found = key
        if found is None:
            raise JoinRefused("unknown", "unknown join code (mistyped, or from another cortex)")
        entry = self._codes[found]
        if entry.used_at is not None:
            raise JoinRefused("used", "this join code was used already; mint another")
        if now >= entry.expires_at:
            raise JoinRefused("expired", "this join code has expired; mint another")
        self._codes[found] = attrs.evolve(entry, used_at=now, used_by=by)

    @property
    def outstanding(self) -> int:
        """Codes that would still admit."""
        now = self.clock()
        return sum(1 for c in self._codes.values() if c.used_at is None and now < c.expires_at)

    def _forget_old(self) -> None:
        cutoff = self.clock() - self.ttl_s
        for key in [k for k, c in self._codes.items() if c.expires_at < cutoff]:
            del self._codes[key]
