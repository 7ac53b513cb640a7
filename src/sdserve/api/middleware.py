"""Plain ASGI middleware (no per-request task overhead): the request body guard, security headers and
request metrics."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdserve.api.errors import render
from sdserve.api.metrics import Metrics

log = logging.getLogger(__name__)

# Deeper JSON than this is no request any dialect defines (A1111's deepest, alwayson_scripts args, is ~6).
MAX_JSON_DEPTH = 64


class BadJSON(ValueError):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def check_json(body: bytes) -> None:
    """Reject what no handler should ever see: nesting past MAX_JSON_DEPTH (400) and NaN or ±Infinity,
    which Python's json accepts but no JSON response can carry (422, naming the field). Malformed JSON is
    left to the route, which answers it in its own dialect."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise BadJSON(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        return
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadJSON(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, float) and not math.isfinite(item):
            field = path or "body"
            raise BadJSON(422, f"{field}: {item} is not a number JSON allows; send a finite number", field)
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))


def _json_part(scope: Scope, body: bytes) -> bytes:
    """The body's JSON: all of it, or with the Open Inference Protocol's binary tensor extension the header whose
    length `Inference-Header-Content-Length` gives (binary tensor data follows it)."""
    for name, value in scope["headers"]:
        if name == b"inference-header-content-length":
            try:
                return body[:int(value)]
            except ValueError:
                return body  # the route answers a bad length in its own dialect
    return body


def _is_json(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return kind == b"application/json" or kind.endswith(b"+json")
    return True  # no content type: FastAPI and /invocations read the body as JSON


# A chunked body over the limit is read on (and dropped) up to this many times the limit, for at most DRAIN_S,
# before the 413, so the client gets to read it.
DRAIN_FACTOR = 4
DRAIN_S = 10.0


class BodyLimitMiddleware:
    """Reads the whole request body before the app sees it: 413 past the size limit, by Content-Length up
    front or by counting a chunked body. A body read to its end also keeps the connection reusable after
    any error answer (401, 422, ...)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body is larger than the {self.max_bytes // 2**20} MB limit"
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await render(scope["path"], 413, too_large, headers={"Connection": "close"})(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _discard_rest(receive, DRAIN_FACTOR * self.max_bytes - size, DRAIN_S)
                await render(scope["path"], 413, too_large, headers={"Connection": "close"})(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


async def _discard_rest(receive: Receive, max_bytes: int, seconds: float) -> None:
    """Read and drop the rest of a body that is over the limit before answering 413, as nginx's lingering close
    does: a server that answers and closes while the client is still sending resets the connection, and the
    client never reads the answer. Bounded in bytes and time, so a huge or slow body cannot hold a worker."""
    with anyio.move_on_after(seconds):
        while max_bytes > 0:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
            max_bytes -= len(message.get("body", b""))


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notices, for streaming responses

    return replayed


class JSONGuardMiddleware:
    """`check_json` on every JSON body, inside auth (so only callers with a key cost a parse) and inside
    BodyLimitMiddleware (so the body arrives as one message)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD") or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        message = await receive()
        body = message.get("body", b"")
        if body:
            try:
                check_json(_json_part(scope, body))
            except BadJSON as exc:
                await render(scope["path"], exc.status, str(exc), field=exc.field)(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)


# The web UI has no inline script or style and loads nothing from elsewhere, so a strict policy fits;
# it matters because the page keeps the API key in localStorage.
WEB_UI_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """nosniff and no framing on every response; the content security policy on the web UI's files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        web_ui = scope["path"] == "/" or scope["path"].startswith("/ui/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
                if web_ui:
                    headers += [(b"content-security-policy", WEB_UI_CSP.encode()),
                                (b"referrer-policy", b"no-referrer")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class InternalErrorMiddleware:
    """A bug answers 500 with JSON and leaves the connection open. (A handler for Exception registered on
    the app would answer too, but Starlette then re-raises, and the server resets the keep-alive
    connection.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # half a response is out: only closing the connection can tell the client
            message = f"internal error ({type(exc).__name__}); see the server log"
            await render(scope["path"], 500, message)(scope, receive, send)


class MetricsMiddleware:
    """Counts sdserve_requests_total{route,code}, by route template so ids do not explode the labels."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def capture(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status)).inc()
