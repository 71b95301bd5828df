"""Inflating a request body with a cap on what it inflates to: a gzip bomb of 1 MB that
would inflate to 1 GiB costs at most `limit` bytes of output before it is refused.

Pure and blocking (zlib releases the GIL while it inflates): shared.errors.read_body runs
it in a thread, off the event loop. It inflates in bounded steps: at most FEED_BYTES of
input and STEP_BYTES of output per call (`decompressobj().decompress(data, max_length)`),
never `flush()`, which would inflate the rest in one go. Small input pieces keep zlib's
`unconsumed_tail` (copied on every call) small; large output steps keep the calls, and
so the thread's trips through the GIL that the event loop waits on, few.
"""

from __future__ import annotations

import zlib

# What we inflate ourselves (aiohttp's decoding is off: see shared.serve.HANDLER_ARGS).
ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})
FEED_BYTES = 16 * 1024
STEP_BYTES = 256 * 1024
# Concatenated gzip members (RFC 1952 allows them); each costs a fresh inflater, so a
# body of thousands of empty members is refused rather than walked.
MAX_MEMBERS = 64


class InflateError(ValueError):
    """Bytes that are not what their Content-Encoding says (or end too soon)."""


class InflatedTooLarge(Exception):
    """The body inflates to more than the limit; `limit` is in the message."""


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """`data` decoded per `encoding` (gzip or deflate); InflatedTooLarge past `limit`."""
    if encoding not in ENCODINGS:
        raise InflateError(f"cannot decode Content-Encoding {encoding!r}")
    if not data:
        return b""
    gzip = encoding != "deflate"
    # RFC 9110's deflate is the zlib format; some clients send raw deflate: its first
    # byte then does not name method 8 (aiohttp tells the two apart the same way).
    wbits = 16 + zlib.MAX_WBITS if gzip else (zlib.MAX_WBITS if data[0] & 0x0F == 8 else -15)
    out = _Output(limit)
    view = memoryview(data)
    start, members = 0, 1
    while True:
        inflater = zlib.decompressobj(wbits)
        end = _member(inflater, view, start, out, encoding)
        if not gzip or end >= len(view):
            return b"".join(out.parts)
        members += 1
        if members > MAX_MEMBERS:
            raise InflateError(f"more than {MAX_MEMBERS} gzip members")
        start = end


class _Output:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise InflatedTooLarge(f"the body inflates to more than {self.limit} bytes")
        self.parts.append(chunk)


def _member(
    inflater: zlib._Decompress, view: memoryview, start: int, out: _Output, encoding: str
) -> int:
    """Inflate one stream (one gzip member) from `start` into `out`; where it ended."""
    pos = start
    while pos < len(view):
        buf: bytes | memoryview = view[pos : pos + FEED_BYTES]
        pos += len(buf)
        while True:
            try:
                chunk = inflater.decompress(buf, STEP_BYTES)
            except zlib.error as exc:
                raise InflateError(f"not valid {encoding} data: {exc}") from exc
            out.add(chunk)
            if inflater.eof:
                return pos - len(inflater.unused_data)
            buf = inflater.unconsumed_tail
            # A full step may leave output inside zlib even with no input left.
            if not buf and len(chunk) < STEP_BYTES:
                break
    raise InflateError(f"the {encoding} data ends too soon")
