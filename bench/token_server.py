"""A fake upstream that streams one SSE frame per token at a set rate, for many streams.

`python -m bench.token_server --port P [--rate 20] [--frames 64]`

A small asyncio program (an `asyncio.Protocol` on uvloop, no HTTP framework) so
that it costs next to nothing per frame: every POST gets a chunked
`text/event-stream` of `--frames` token frames, one each 1/`--rate` s, then
`data: [DONE]`; each stream is one timer callback per frame. GETs answer a
neuron's poll endpoints (and a runner's /health) from canned JSON given in
`--canned FILE` ({path: json}), so cortex can front it as a neuron and a neuron
as a runner. POST /v1/completions (a neuron's warmup) streams all frames at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from shared.serve import new_event_loop

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def token_frame(i: int, model: str = "bench", last: bool = False) -> bytes:
    """One OpenAI chat chunk as an SSE event."""
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": {} if last else {"content": f"t{i} "},
                "finish_reason": "stop" if last else None,
            }
        ],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Conn(asyncio.Protocol):
    def __init__(self, server: TokenServer) -> None:
        self.s = server
        self.buf = b""
        self.t: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.t = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            method, path = head[0].split(" ")[:2]
            self.answer(method, path)

    def answer(self, method: str, path: str) -> None:
        assert self.t is not None
        if method == "GET":
            body = self.s.canned.get(path.split("?")[0])
            if body is None:
                self.t.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            self.t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        self.t.write(HEAD)
        if path.endswith("/v1/completions"):
            self.t.write(_chunk(b"".join(self.s.frames)) + b"0\r\n\r\n")
            return
        self.busy = True
        self.s.loop.call_later(self.s.interval, self.tick, 0)

    def tick(self, i: int) -> None:
        if self.t is None or self.t.is_closing():
            return
        frames = self.s.frames
        self.t.write(_chunk(frames[i]))
        if i + 1 < len(frames):
            self.s.loop.call_later(self.s.interval, self.tick, i + 1)
            return
        self.t.write(b"0\r\n\r\n")
        self.busy = False
        if self.buf:
            self.data_received(b"")


class TokenServer:
    def __init__(self, rate: float, frames: int, canned: dict[str, bytes]) -> None:
        self.loop = asyncio.get_running_loop()
        self.interval = 1.0 / rate
        body = [token_frame(i) for i in range(frames - 1)]
        self.frames = [*body, token_frame(frames, last=True), b"data: [DONE]\n\n"]
        self.canned = canned


async def serve(port: int, rate: float, frames: int, canned: dict[str, bytes]) -> None:
    server = TokenServer(rate, frames, canned)
    srv = await server.loop.create_server(lambda: _Conn(server), "127.0.0.1", port, backlog=4096)
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=20.0, help="frames per second per stream")
    p.add_argument("--frames", type=int, default=64, help="token frames per stream")
    p.add_argument("--canned", type=Path, help="JSON file {path: answer} for GETs")
    args, _ = p.parse_known_args(argv)
    raw: dict[str, Any] = json.loads(args.canned.read_text()) if args.canned else {}
    canned = {k: json.dumps(v).encode() for k, v in raw.items()}
    canned.setdefault("/health", b'{"status":"ok"}')
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.port, args.rate, args.frames, canned))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
