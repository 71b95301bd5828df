"""The floor of a Python hop: a bare aiohttp reverse proxy, the `aiohttp` arm of bench.gateway.

`python -m bench.bare_proxy --route PORT=URL [--route PORT=URL ...]`

Each `--route` listens on 127.0.0.1:PORT and forwards every request to URL, as
cortex does on the same framework with none of its features: the method, the
path and query, the body, and the headers the fakes answer by (Content-Type,
and X-Bench-Stream, which makes bench.gateway's nginx fake stream). The answer's
status, Content-Type and Content-Length come back, and its body is streamed to
the client chunk by chunk as it arrives (`iter_any`). One shared ClientSession
with a keep-alive connector and no connection limit; uvloop, as cortex runs;
no access log, no retries, no parsing, no timeouts beyond aiohttp's own socket
handling. Whatever cortex spends above this per request or per frame is cortex's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import aiohttp
from aiohttp import web

from shared.serve import new_event_loop

# Only what the fakes choose their answer by; the rest (Host, Content-Length,
# Connection) the client session sets itself.
FORWARDED = ("Content-Type", "X-Bench-Stream")
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    app = request.app
    body = await request.read()
    headers = {h: v for h in FORWARDED if (v := request.headers.get(h)) is not None}
    url = app[UPSTREAM] + request.path_qs
    async with app[SESSION].request(request.method, url, data=body or None, headers=headers) as up:
        out = web.StreamResponse(status=up.status)
        kind = up.headers.get("Content-Type")
        if kind is not None:
            out.headers["Content-Type"] = kind
        if up.content_length is not None:
            out.content_length = up.content_length  # else chunked, as the upstream sent it
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


def route(text: str) -> tuple[int, str]:
    port, sep, url = text.partition("=")
    if not sep or not port.isdigit() or not url.startswith("http://"):
        raise argparse.ArgumentTypeError(f"want PORT=http://HOST:PORT, got {text!r}")
    return int(port), url.rstrip("/")


async def serve(routes: list[tuple[int, str]], host: str) -> None:
    # No read timeout: a paced stream is silent between frames, as long as it likes.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=False,
    )
    runners = []
    try:
        for port, upstream in routes:
            app = web.Application()
            app[UPSTREAM], app[SESSION] = upstream, session
            app.router.add_route("*", "/{tail:.*}", relay)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port, backlog=4096).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        await session.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.bare_proxy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench.bare_proxy --route 8081=http://127.0.0.1:8080",
    )
    p.add_argument(
        "--route",
        type=route,
        action="append",
        required=True,
        metavar="PORT=URL",
        help="listen on PORT and forward to URL (repeatable)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = p.parse_args(argv)
    loop = new_event_loop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            loop.run_until_complete(serve(args.route, args.host))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
