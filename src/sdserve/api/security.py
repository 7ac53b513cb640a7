"""Auth: API keys (`Authorization: Bearer KEY` or `X-API-Key: KEY`, from `--api-key` and the keys file, see
keys.py) and, as A1111's `--api-auth` does, HTTP Basic users. Compared in constant time; never logged."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Iterable

import anyio
from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdserve.api.errors import render
from sdserve.keys import ANONYMOUS, Caller, KeyBook, address_caller, user_caller
from sdserve.ratelimit import Limiter

# Who fetches an image through a signed link without a key: nobody's jobs are theirs.
LINK_CALLER = Caller(id="link:", label=ANONYMOUS)

# Probes must work without a key (load balancers and kubelets do not carry one).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/ping", "/v2/health/live", "/v2/health/ready"})


def key_matches(candidate: str | None, keys: Iterable[str]) -> bool:
    if not candidate:
        return False
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(candidate.encode(), key.encode())
    return ok


def parse_users(entries: Iterable[str]) -> list[tuple[str, str]]:
    """`user:pass` entries (A1111's --api-auth "u1:p1,u2:p2")."""
    users = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user:
            raise ValueError(f"--api-auth entries look like user:password, not {entry!r}")
        users.append((user, password))
    return users


def _is_public(scope: Scope) -> bool:
    path = scope["path"]
    if path in PUBLIC_PATHS or path.startswith("/ui/"):
        return True
    # The web UI's page itself (GET / without a prompt) loads without a key, then asks for one. The query is
    # decoded by the same parser the route uses, so `?%70rompt=` is the prompt it is to the route.
    return path == "/" and scope["method"] == "GET" and "prompt" not in QueryParams(scope.get("query_string", b""))


def caller_of(scope: Scope) -> Caller:
    """The API key (hashed, never kept as is) or Basic user that auth accepted, else, with auth off, the
    client's address."""
    client = scope.get("client")
    return scope.get("state", {}).get("caller") or address_caller(client[0] if client else "unknown")


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyBook, users: list[tuple[str, str]] | None = None,
                 signed: Callable[[Scope], str | None] | None = None) -> None:
        """`signed`: the image id of a request carrying a valid signed image link (urls.ImageLinks), which needs
        no key: the link is the credential, for that one image, until it expires."""
        self.app = app
        self.keys = keys
        self.users = [f"{u}:{p}" for u, p in users or []]
        self.signed = signed

    def _caller(self, headers: dict[str, str]) -> Caller | None:
        """The accepted caller's identity, or None when the credentials are missing or wrong."""
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "basic" and self.users:
            try:
                credentials = base64.b64decode(value.strip()).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return user_caller(credentials.partition(":")[0]) if key_matches(credentials, self.users) else None
        token = value.strip() if scheme.lower() == "bearer" else headers.get("x-api-key")
        # Headers were read as latin-1, byte for byte: the key is compared as the bytes sent (UTF-8 for non-ASCII).
        return self.keys.lookup(token.encode("latin-1") if token else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (self.keys.active or self.users) or _is_public(scope):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        caller = self._caller(headers)
        # A signed link opens its one image, whether or not a key comes with it (a colleague's link).
        # Only an image path with a signature is checked (in a thread: the secret may be read from the store), so
        # every other request pays nothing for links.
        linked = (self.signed is not None and scope["path"].startswith("/api/v1/images/")
                  and b"signature=" in scope.get("query_string", b""))
        signed = await anyio.to_thread.run_sync(self.signed, scope) if linked else None
        if signed is not None:
            state = scope.setdefault("state", {})
            state["signed_image"] = signed
            state["caller"] = caller or LINK_CALLER  # never the auth-off caller, who sees everything
            await self.app(scope, receive, send)
            return
        if caller is not None:
            scope.setdefault("state", {})["caller"] = caller
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path.startswith("/sdapi/") and self.users:
            message, challenge = "Incorrect username or password", 'Basic realm="sdserve"'
        else:
            message = "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            challenge = 'Bearer realm="sdserve"' if self.keys.active else 'Basic realm="sdserve"'
        response = render(path, 401, message, headers={"WWW-Authenticate": challenge},
                          error_type="invalid_api_key" if path.startswith("/v1/") else None)
        await response(scope, receive, send)


class RateLimitMiddleware:
    """Per-caller submission limits (ratelimit.py): each POST, and `GET /?prompt=`, takes a token; over the
    limit, a 429 in the dialect's shape with Retry-After and RateLimit headers; under it, the RateLimit
    headers on the response. Runs inside auth, so the caller is the key or user auth accepted. (Each route
    passes its caller to the service itself: its images, label, priority and fair-share turn.)"""

    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        submission = scope["method"] == "POST" or (
            scope["path"] == "/" and "prompt" in QueryParams(scope.get("query_string", b"")))
        caller = caller_of(scope) if submission else None
        if caller is None or self.limiter.request_rate(caller) is None:  # nothing to count: no thread hop
            await self.app(scope, receive, send)
            return
        decision = await anyio.to_thread.run_sync(self.limiter.request, caller)
        if not decision.allowed:
            response = render(scope["path"], 429, f"rate limit: over {decision.limit} submissions from this caller "
                              f"in a burst; retry in {decision.retry_after_s} s", headers=decision.headers(),
                              code="rate_limit_exceeded")
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *((k.lower().encode(), v.encode())
                                                            for k, v in decision.headers().items())]
            await send(message)

        await self.app(scope, receive, send_with_headers)
