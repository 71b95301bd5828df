"""`web.run_app` as `cortex serve` and `neuron serve` use it: uvloop, no access log.

uvloop's loop is a third or more cheaper per proxied chunk than asyncio's (the
relay is mostly socket reads and writes); aiohttp's access log formats and
writes a line per request, which costs more than routing one. Both are levers
the gateway bench measures (bench/gateway.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (Linux, macOS), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_app(
    app: web.Application,
    *,
    access_log: bool,
    **kwargs: Any,
) -> None:
    """Serve `app` until a signal; `access_log` logs a line per request (off by default)."""
    from aiohttp.log import access_logger

    web.run_app(
        app,
        loop=new_event_loop(),
        access_log=access_logger if access_log else None,
        **kwargs,
    )
