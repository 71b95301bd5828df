"""The one error tree of cortex + neuron, rendered as the OpenAI error envelope.

Every error carries its HTTP status, a stable machine code and, for conditions
that will pass, a Retry-After in seconds.  A transient condition is never a 404:
LiteLLM benches an upstream that answers 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, TypeGuard

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from shared.inflate import ENCODINGS, InflatedTooLarge, InflateError, inflate

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60


class ApiError(Exception):
    """Base of every error a client may see; subclasses fix status and code."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    type: ClassVar[str] = "server_error"
    default_retry_after: ClassVar[int | None] = None
    # The connection cannot carry another request (its body was never read to the end).
    close_connection: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        ra = self.default_retry_after if retry_after is None else retry_after
        self.retry_after = None if ra is None else max(1, min(MAX_RETRY_AFTER_S, ra))
        # Extra structured context (placement arithmetic, stderr tail...).
        self.details = details

    @property
    def retryable(self) -> bool:
        return self.retry_after is not None

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        if self.details is not None:
            err["details"] = self.details
        return {"error": err}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def to_response(self) -> web.Response:
        resp = web.json_response(self.to_json(), status=self.status, headers=self.headers())
        if self.close_connection:
            resp.force_close()
        return resp

    @classmethod
    def from_envelope(cls, status: int, body: Any, retry_after: str | None = None) -> ApiError:
        """Rebuild a typed error from another service's envelope (cortex reading a neuron)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return UpstreamError(f"upstream answered {status} without an error envelope")
        code = str(err.get("code", ""))
        message = str(err.get("message", ""))
        ra: int | None = None
        if retry_after is not None:
            try:
                ra = int(float(retry_after))
            except ValueError:
                ra = None
        for sub in _all_subclasses(ApiError):
            if sub.code == code and sub.status == status:
                return sub(
                    message, param=err.get("param"), retry_after=ra, details=err.get("details")
                )
        generic = UpstreamError(message or f"upstream answered {status}")
        return generic


def _all_subclasses(cls: type[ApiError]) -> list[type[ApiError]]:
    out: list[type[ApiError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


class InvalidRequest(ApiError):
    status = 400
    code = "invalid_request"
    type = "invalid_request_error"


class BadRequestBody(InvalidRequest):
    """A body that could not be read: bad gzip, bad chunked encoding, cut short."""

    close_connection = True


class PlacementRefused(InvalidRequest):
    """An explicit load that cannot fit; the message carries the arithmetic."""

    code = "placement_refused"


class InvalidModelPath(InvalidRequest):
    code = "invalid_model_path"


class ModelNotFound(ApiError):
    status = 404
    code = "model_not_found"
    type = "invalid_request_error"


class NoFeasibleNode(ApiError):
    status = 404
    code = "no_feasible_node"
    type = "invalid_request_error"


class NotFound(ApiError):
    status = 404
    code = "not_found"
    type = "invalid_request_error"


class InvalidApiKey(ApiError):
    status = 401
    code = "invalid_api_key"
    type = "authentication_error"


class ModelNotAllowed(ApiError):
    status = 403
    code = "model_not_allowed"
    type = "permission_error"


class RequestCancelled(ApiError):
    """A request ended by DELETE /v1/requests/{id} (its sender or an operator).

    499, nginx's "client closed request" (sglang and gRPC's CANCELLED use it too): a
    4xx, so no client or gateway retries it (LiteLLM and the OpenAI SDKs retry only
    408, 409, 429 and 5xx) and LiteLLM does not bench the upstream (it does on 404).
    """

    status = 499
    code = "request_cancelled"
    type = "invalid_request_error"

    def to_response(self) -> web.Response:
        resp = super().to_response()
        resp.set_status(self.status, "Request Cancelled")  # no standard reason to fall back on
        return resp


class RequestNotYours(ApiError):
    """A cancel of a request another API key sent: only its sender or the admin token."""

    status = 403
    code = "request_not_yours"
    type = "permission_error"


class ModelKeptLoaded(ApiError):
    """An unload the reconciler would undo at once (keep_loaded or pinned_on)."""

    status = 409
    code = "model_kept_loaded"
    type = "invalid_request_error"


class RingPortTaken(ApiError):
    """A group load whose ring port this member cannot bind (another process holds it):
    refused before any runner starts; cortex skips to another block of ports.

    `details`: {"host", "port"}. No Retry-After: the same block would fail again.
    """

    status = 409
    code = "ring_port_taken"
    type = "invalid_request_error"


class ForceNeedsAdminToken(ApiError):
    """A forced load overrides placement's refusal: only an operator holding the token."""

    status = 403
    code = "admin_token_required"
    type = "permission_error"


class JoinCodeRefused(ApiError):
    """POST /join with a code that admits no one: unknown, expired or used (the message
    says which). Never retried: a new code is an operator's `cortex join-code`."""

    status = 403
    code = "join_code_refused"
    type = "permission_error"


class NoFleetToken(ApiError):
    """A join code asked of a cortex with no fleet token: it has nothing to hand out."""

    status = 409
    code = "no_fleet_token"
    type = "invalid_request_error"


class RebootNotAllowed(ApiError):
    """POST /admin/reboot on a neuron not configured to (allow_reboot = false, or no
    fleet token): the message gives the command to run by hand instead."""

    status = 403
    code = "reboot_not_allowed"
    type = "permission_error"


class RebootFailed(ApiError):
    """The node's reboot command failed (no sudo right, say): its output is the message."""

    status = 500
    code = "reboot_failed"
    type = "server_error"


class RequestTooLarge(ApiError):
    status = 413
    code = "request_too_large"
    type = "invalid_request_error"
    # The rest of the body is never read: the connection cannot carry another request.
    close_connection = True


class RequestTimeout(ApiError):
    """A body that did not arrive within the server's body_timeout_s."""

    status = 408
    code = "request_timeout"
    type = "invalid_request_error"
    close_connection = True


class QueueFull(ApiError):
    status = 429
    code = "queue_full"
    type = "rate_limit_error"
    default_retry_after = 1


class TooManyConnections(ApiError):
    """A client address over max_connections_per_address; answered, then closed, before
    any request on the connection is read (shared.serve)."""

    status = 429
    code = "too_many_connections"
    type = "rate_limit_error"
    default_retry_after = 1


class InsufficientStorage(ApiError):
    """A stage that would take the store's disk below its free-space floor (min_free_gb),
    refused before a byte is written; or one the disk filled up under (ENOSPC), ended
    as a job with this code and the same arithmetic, its partial files kept.

    Not retryable by itself: disk frees only when an operator (or the budget) acts.
    """

    status = 507
    code = "insufficient_storage"


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"
    type = "server_error"
    default_retry_after = 2


class FeasibleNodeUnhealthy(ServiceUnavailable):
    code = "feasible_node_unhealthy"
    default_retry_after = 3


class NoHealthyNodes(ServiceUnavailable):
    code = "no_healthy_nodes"
    default_retry_after = 5


class ModelLoading(ServiceUnavailable):
    code = "model_loading"
    default_retry_after = 2


class ColdLoadFailed(ServiceUnavailable):
    code = "cold_load_failed"
    default_retry_after = 5


class UpstreamUnavailable(ServiceUnavailable):
    code = "upstream_unavailable"
    default_retry_after = 2


class PlacementInfoPending(ServiceUnavailable):
    code = "placement_info_pending"
    default_retry_after = 3


class ShuttingDown(ServiceUnavailable):
    """The service is draining (SIGTERM): another replica, or this one restarted, will do."""

    code = "shutting_down"
    default_retry_after = 2


class ModelFailed(ServiceUnavailable):
    """A runner that crashed repeatedly; retryable because an operator may fix it."""

    code = "model_failed"
    default_retry_after = 10


class UpstreamError(ApiError):
    """An answer from a peer we could not classify."""

    status = 502
    code = "upstream_error"
    type = "server_error"


class InternalError(ApiError):
    status = 500
    code = "internal_error"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every ApiError (and aiohttp's own HTTP errors) as the OpenAI envelope."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.to_response()
    except web.HTTPRequestEntityTooLarge as exc:
        return RequestTooLarge(exc.text or "request body too large").to_response()
    except web.HTTPNotFound:
        return NotFound(f"no route for {request.method} {request.path}").to_response()
    except web.HTTPMethodNotAllowed:
        err = InvalidRequest(f"method {request.method} not allowed on {request.path}")
        resp = err.to_response()
        resp.set_status(405)
        return resp
    except web.HTTPException:
        raise
    except ConnectionResetError as exc:  # aiohttp's "Cannot write to closing transport" too
        transport = request.transport
        if transport is not None and not transport.is_closing():
            return _unhandled(request)  # an upstream's reset that nobody handled: ours
        # The client reset its connection while we wrote: its loss, not our fault. The
        # answer returned here is never sent (aiohttp finds the transport gone); an
        # access log shows nginx's 499, "client closed request".
        log.debug("%s %s: the client went away: %s", request.method, request.path, exc)
        return web.Response(status=499)
    except Exception:
        return _unhandled(request)


def _unhandled(request: web.Request) -> web.Response:
    # A bug of ours: still the envelope (clients parse it), and the traceback logged.
    log.exception("unhandled error on %s %s", request.method, request.path)
    return InternalError("internal error; see the server log").to_response()


# The decoded body once read: a handler may ask twice (cortex forwards the very bytes).
BODY = web.RequestKey("body", bytes)
# Seconds the whole body may take to arrive; shared.serve's guard sets it per request.
BODY_TIMEOUT = web.RequestKey("body_timeout_s", float)
DEFAULT_BODY_TIMEOUT_S = 60.0
IDENTITY = frozenset({"", "identity"})
# Inflating runs here, off the event loop, one body at a time: a body holds at most its
# limit of output, so eight gzip bombs at once cost one limit of memory, not eight (a
# body inflates in milliseconds, and compressed requests are rare).
_INFLATE_THREADS = 1
_inflaters: ThreadPoolExecutor | None = None


async def read_body(request: web.Request) -> bytes:
    """The (decoded) request body, or the typed error: 413 past `client_max_size` (raw
    or inflated), 408 past the body timeout, 400 for bytes we cannot read."""
    if BODY in request:
        return request[BODY]
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    # Apps served with shared.serve.HANDLER_ARGS get the raw bytes; another aiohttp
    # server (a runner's) may have decoded them already.
    decoded = getattr(request.content, "total_compressed_bytes", None) is not None
    if not decoded and encoding not in IDENTITY | ENCODINGS:
        raise InvalidRequest(
            f"unsupported Content-Encoding {encoding[:40]!r} (gzip and deflate are)"
        )
    limit = request.client_max_size
    raw = await _read_raw(request, limit, decoded)
    body = raw if decoded or encoding in IDENTITY else await _inflated(raw, encoding, limit)
    request[BODY] = body
    return body


async def _read_raw(request: web.Request, limit: int, decoded: bool) -> bytes:
    """The body's bytes as they came, at most `limit` of them, within the body timeout."""
    length = request.content_length
    if length is not None and length > limit:
        _too_large(request, decoded)
        raise RequestTooLarge(f"request body of {length} bytes over the limit of {limit}")
    timeout = request.get(BODY_TIMEOUT, DEFAULT_BODY_TIMEOUT_S)
    # A small body has nearly always come whole with its headers: no timer for it.
    whole = request.content.is_eof()
    try:
        async with asyncio.timeout(None if whole else timeout):
            return await _read_capped(request.content, limit)
    except _OverLimit as exc:
        _too_large(request, decoded)
        raise RequestTooLarge(f"request body over the limit of {limit} bytes") from exc
    except TimeoutError as exc:
        _abandon(request)
        raise RequestTimeout(f"the request body did not arrive within {timeout:g} s") from exc
    except web.RequestPayloadError as exc:
        # The parser gave up on this body (bad chunked framing, cut short...).
        _abandon(request)
        cause = exc.__cause__ or exc
        raise BadRequestBody(f"cannot read the request body: {_describe(cause)}") from exc


class _OverLimit(Exception):
    pass


async def _read_capped(stream: StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while chunk := await stream.readany():
        total += len(chunk)
        if total > limit:
            raise _OverLimit
        parts.append(chunk)
    return b"".join(parts)


def _too_large(request: web.Request, decoded: bool) -> None:
    # Raw bytes past the limit cost aiohttp little to read and drop (for up to its
    # lingering time, so that the client can still read the 413); bytes aiohttp
    # inflates would be inflated to the end of the bomb first.
    if decoded:
        _abandon(request)


def _abandon(request: web.Request) -> None:
    """Read no more of this body: the connection closes once the answer is written.
    Else aiohttp reads on and discards what is left of it, for up to its lingering time:
    inflating it, when it decodes the body; raising again (logged as a crash) when its
    parser had given up on it."""
    request.protocol.close()
    request.content.feed_eof()


async def _inflated(raw: bytes, encoding: str, limit: int) -> bytes:
    global _inflaters
    if _inflaters is None:
        _inflaters = ThreadPoolExecutor(_INFLATE_THREADS, thread_name_prefix="inflate")
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(_inflaters, inflate, raw, encoding, limit)
    except InflatedTooLarge as exc:
        raise RequestTooLarge(f"request body over the limit of {limit} bytes") from exc
    except InflateError as exc:
        raise InvalidRequest(f"cannot read the request body: {exc}") from exc


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(text).splitlines()[0][:200] if str(text).strip() else type(exc).__name__


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest."""
    raw = await read_body(request)
    try:
        # NaN and Infinity are not JSON; a runner would choke on them downstream.
        # (json.loads would build a decoder per call; the text as json.loads finds it.)
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError as exc:
        raise InvalidRequest("body is not valid JSON: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
        raise InvalidRequest(f"body is not valid JSON: {_describe(exc)}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    return body


def reject_unknown(body: dict[str, Any], known: Iterable[str]) -> None:
    """InvalidRequest naming every field of `body` not in `known` (an admin body is strict)."""
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}", param=unknown[0])


class _ClientFaultFilter(logging.Filter):
    """aiohttp logs a malformed request (bad request line, header, chunk) as an ERROR
    with a traceback: the client's fault, not ours, so one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and isinstance(
            exc, HttpProcessingError | web.RequestPayloadError
        ):
            record.msg = f"{record.getMessage()}: bad request: {_describe(exc)}"
            record.args = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_bad_requests() -> None:
    """Install the filter above on aiohttp's server logger, once per process.

    The answer itself stays aiohttp's plain-text 400: its parser errors are written
    by the protocol before any application code (or middleware) runs.
    """
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaultFilter) for f in logger.filters):
        logger.addFilter(_ClientFaultFilter())


def sse_error_frame(message: str, status: int = 502, code: str = "upstream_error") -> bytes:
    """The frame that ends a stream which failed after its first byte: the envelope's
    fields (`code` the machine code, as in every other error) and the HTTP `status` the
    error would have had before the first byte (cortex answers a 4xx one as such)."""
    err = {
        "message": message,
        "type": _type_of(code, status),
        "code": code,
        "param": None,
        "status": status,
    }
    return b"data: " + json.dumps({"error": err}).encode() + b"\n\ndata: [DONE]\n\n"


def _type_of(code: str, status: int) -> str:
    for sub in _all_subclasses(ApiError):
        if sub.code == code:
            return sub.type
    return "invalid_request_error" if status < 500 else "server_error"


def frame_error(err: Any) -> tuple[int, str]:
    """(HTTP status, machine code) of a stream's error frame's `error`.

    A neuron older than issue 19 put the status in `code` and the machine code in
    `type`; a cortex reads both shapes, so either may be upgraded first.
    """
    if not isinstance(err, dict):
        return 502, UpstreamError.code
    status, code = err.get("status"), err.get("code")
    if _is_int(code):  # the old shape
        return code, str(err.get("type") or UpstreamError.code)
    return (status if _is_int(status) else 502), str(code or UpstreamError.code)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
