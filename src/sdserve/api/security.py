"""API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY`, compared in constant time, never logged."""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

# Probes must work without a key (load balancers and kubelets do not carry one).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


def key_matches(candidate: str | None, keys: Iterable[str]) -> bool:
    if not candidate:
        return False
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(candidate.encode(), key.encode())
    return ok


def _is_public(scope: Scope) -> bool:
    path = scope["path"]
    if path in PUBLIC_PATHS or path.startswith("/ui/"):
        return True
    # The web UI's page itself (GET / without ?prompt=) loads without a key, then asks for one.
    return path == "/" and scope["method"] == "GET" and b"prompt=" not in scope.get("query_string", b"")


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k for k in keys if k]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or _is_public(scope):
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope["headers"]}
        token = headers.get("x-api-key")
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        if key_matches(token, self.keys):
            await self.app(scope, receive, send)
            return
        body = json.dumps({
            "detail": "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        }).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="sdserve"'),
        ]})
        await send({"type": "http.response.body", "body": body})
