"""The RDMA queue-pair quirk of jaccl groups, recognised in a rank's stderr.

After many load/unload cycles on a jaccl cluster the Thunderbolt RDMA queue
pairs degrade until a reboot (the Odysseus runbook's fix); a rank then dies
with errno 16 (EBUSY), 96 (ENODATA on macOS, EPFNOSUPPORT on Linux) or 2
(ENOENT) from the verbs layer. Pure text matching, so it is tested on samples.
"""

from __future__ import annotations

import re

QUIRK_ERRNOS = frozenset({2, 16, 96})
_NUMERIC = re.compile(r"\berrno\b\s*[=:(]?\s*(\d+)|\[errno\s+(\d+)\]", re.IGNORECASE)
_NAMES = {"EBUSY": 16, "ENODATA": 96, "EPFNOSUPPORT": 96, "ENOENT": 2}
_NAMED = re.compile(r"\b(" + "|".join(_NAMES) + r")\b")

ADVICE = (
    "likely the jaccl RDMA queue-pair quirk (errno {errno} in rank {rank}'s stderr): "
    "RDMA queue pairs degrade after many load/unload cycles; reboot this node to reset them"
)


def quirk_errno(text: str) -> int | None:
    """The first errno of the quirk named in `text` (a stderr tail), if any."""
    for m in _NUMERIC.finditer(text):
        n = int(m[1] or m[2])
        if n in QUIRK_ERRNOS:
            return n
    named = _NAMED.search(text)
    return _NAMES[named[1]] if named else None


def classify(backend: str, rank: int, stderr_tail: str) -> str | None:
    """The advice to put first in a jaccl rank's error, or None (another cause)."""
    if backend != "jaccl":
        return None
    n = quirk_errno(stderr_tail)
    return None if n is None else ADVICE.format(errno=n, rank=rank)
