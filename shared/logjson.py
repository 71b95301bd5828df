"""`log_format = "json"`: one JSON object per log line, on stdout, for log shippers.

Each line has `ts` (UTC, ISO 8601), `level`, `logger`, `message` and `service`, and
where known the request's `request_id`, `model` and `node` (a neuron's own name on
every line it logs). The request middleware puts the request id in a contextvar;
the handlers add the model and the node once they know them (`annotate`); the
formatter reads it for each line, so every line logged while a request is served,
in its task or in a thread it started (asyncio.to_thread copies the context), has
them. Text stays the default: `configure("text", ...)` changes nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from shared.request_id import is_request_id

LogFormat = Literal["text", "json"]

# The request being served: request_id, model, node (a dict per request, so what a
# handler adds is seen by every line of that request and of no other).
_CONTEXT: ContextVar[dict[str, str] | None] = ContextVar("log_context", default=None)
# The X-Request-Id a client may choose (as cortex.http.proxy and neuron.tracing take it).


def annotate(**fields: str | None) -> None:
    """Add what is now known of the request being served (model=..., node=...)."""
    ctx = _CONTEXT.get()
    if ctx is not None:
        ctx.update({k: v for k, v in fields.items() if v})


def header_request_id(request: web.Request) -> str | None:
    given = request.headers.get("X-Request-Id", "")
    return given if is_request_id(given) else None


def middleware(request_id: Callable[[web.Request], str | None]) -> Middleware:
    """Outermost middleware: the request's id (as `request_id` gives it) on its lines."""

    @web.middleware
    async def log_context(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request)
        token = _CONTEXT.set({"request_id": rid} if rid else {})
        try:
            return await handler(request)
        finally:
            # A keep-alive connection serves its next request in the same task.
            _CONTEXT.reset(token)

    return log_context


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: ts, level, logger, message, service, context."""

    def __init__(self, service: str, static: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.base = {"service": service, **(static or {})}

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.base,
            **(_CONTEXT.get() or {}),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: a line stays one line, whatever the message holds.
        return json.dumps(out, default=str)


def configure(
    log_format: LogFormat, *, service: str, static: Mapping[str, str] | None = None
) -> None:
    """Format the root logger's handlers (logging.basicConfig's) as `log_format` says;
    JSON lines go to stdout, where a runbook's shipper reads them."""
    if log_format != "json":
        return
    formatter = JsonFormatter(service, static)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(sys.stdout)


def install(
    app: web.Application, log_format: LogFormat, request_id: Callable[[web.Request], str | None]
) -> None:
    """With JSON logs, the request context middleware outermost in `app` (before it
    starts: its middlewares freeze then)."""
    if log_format == "json":
        app.middlewares.insert(0, middleware(request_id))


def printer(log_format: LogFormat, logger: str) -> Callable[[str], None]:
    """Where a service's startup banner goes: stdout as text, or a log line (stdout
    then carries JSON lines only)."""
    if log_format == "json":
        return logging.getLogger(logger).info
    return lambda msg: print(msg, flush=True)
