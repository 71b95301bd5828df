"""Request ids: a client's X-Request-Id if it is a sane token, else one of ours.

Ours are 32 hex digits like a uuid4's, but a random per-process prefix and a
counter: unique without reading the kernel's random source per request
(os.urandom is a syscall, on every request of both hops).
"""

from __future__ import annotations

import itertools
import os
import re

RULE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PREFIX = os.urandom(8).hex()
_COUNT = itertools.count(1)


def is_request_id(value: str) -> bool:
    return bool(RULE.match(value))


def new_request_id() -> str:
    return f"{_PREFIX}{next(_COUNT):016x}"


def given_or_new(given: str) -> str:
    """`given` (an X-Request-Id header's value) if it is a sane token, else a new id."""
    return given if given and RULE.match(given) else new_request_id()
