"""jaccl RDMA failures a rank's stderr names by errno, each with its advice.

After many load/unload cycles on a jaccl cluster the Thunderbolt RDMA queue
pairs degrade until a reboot (the Odysseus runbook's fix); a rank then dies
with errno 16 (EBUSY), 96 (ENODATA on macOS, EPFNOSUPPORT on Linux) or 2
(ENOENT) from the verbs layer.

The mlx-jaccl-cluster test reference lists two more, each with its own fix:
errno 60, one side's RDMA port is down (check `ibv_devinfo` on both nodes), and
errno 57, a stale process of a crashed run holds the link (stop it, wait,
retry). jaccl runs only on macOS (Thunderbolt RDMA), so these are macOS's
numbers: there 60 is ETIMEDOUT and 57 ENOTCONN (sys/errno.h). On Linux the
same numbers are ENOSTR and EBADSLT (its ETIMEDOUT is 110, ENOTCONN 107), which
is why they are read as numbers only for a jaccl rank.

Pure text matching, so it is tested on samples.
"""

from __future__ import annotations

import re

QUEUE_PAIR_ERRNOS = frozenset({2, 16, 96})
PORT_DOWN_ERRNO = 60  # ETIMEDOUT on macOS
STALE_RANK_ERRNO = 57  # ENOTCONN on macOS
QUIRK_ERRNOS = QUEUE_PAIR_ERRNOS | {PORT_DOWN_ERRNO, STALE_RANK_ERRNO}
_NUMERIC = re.compile(r"\berrno\b\s*[=:(]?\s*(\d+)|\[errno\s+(\d+)\]", re.IGNORECASE)
_NAMES = {
    "EBUSY": 16,
    "ENODATA": 96,
    "EPFNOSUPPORT": 96,
    "ENOENT": 2,
    "ETIMEDOUT": PORT_DOWN_ERRNO,
    "ENOTCONN": STALE_RANK_ERRNO,
}
_NAMED = re.compile(r"\b(" + "|".join(_NAMES) + r")\b")

ADVICE = (
    "likely the jaccl RDMA queue-pair quirk (errno {errno} in rank {rank}'s stderr): "
    "RDMA queue pairs degrade after many load/unload cycles; reboot this node to reset them, "
    "the machine itself (`sudo shutdown -r now` on it): `cortex restart` recycles the neuron "
    "process only, and the queue pairs stay leaked until the machine reboots"
)
PORT_DOWN_ADVICE = (
    "likely a jaccl RDMA port down (errno {errno}, ETIMEDOUT, in rank {rank}'s stderr): "
    "one side of a Thunderbolt RDMA link is PORT_DOWN; check `ibv_devinfo` on every "
    "node of the group (reseat the cable; keep a sleeping node awake), then load again"
)
STALE_RANK_ADVICE = (
    "likely a stale jaccl rank (errno {errno}, ENOTCONN, in rank {rank}'s stderr): "
    "a process of an earlier, crashed run still holds the RDMA connection; unload the "
    "model on every node of the group, stop any jaccl process left there "
    "(`pgrep -fl mlx`), wait a few seconds, then load again"
)


def quirk_errno(text: str) -> int | None:
    """The first jaccl errno with advice named in `text` (a stderr tail), if any."""
    for m in _NUMERIC.finditer(text):
        n = int(m[1] or m[2])
        if n in QUIRK_ERRNOS:
            return n
    named = _NAMED.search(text)
    return _NAMES[named[1]] if named else None


def advice_for(errno: int, rank: int) -> str:
    """The advice line for one of QUIRK_ERRNOS."""
    if errno == PORT_DOWN_ERRNO:
        template = PORT_DOWN_ADVICE
    elif errno == STALE_RANK_ERRNO:
        template = STALE_RANK_ADVICE
    else:
        template = ADVICE
    return template.format(errno=errno, rank=rank)


def classify(backend: str, rank: int, stderr_tail: str) -> str | None:
    """The advice to put first in a jaccl rank's error, or None (another cause)."""
    if backend != "jaccl":
        return None
    n = quirk_errno(stderr_tail)
    return None if n is None else advice_for(n, rank)
