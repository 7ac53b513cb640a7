"""Where absolute URLs come from, and which Host headers are honoured.

An absolute URL (OpenAI's `url`) starts with `--public-url` when it is set. Otherwise with the request's Host,
which is honoured only when it is in `--allowed-hosts`: any other Host gets 400, so a forged Host never ends up
in a link the server hands out (Django's ALLOWED_HOSTS, Starlette's TrustedHostMiddleware). Probes are exempt:
kubelets and load balancers call them by address.

Image URLs that leave the server are signed and expire (`ImageLinks`): whoever holds one may fetch that image
until then without an API key, as with OpenAI's own hosted URLs and S3's presigned ones, and nobody can make
one for another image.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterable

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from sdserve.api.errors import render
from sdserve.api.security import PUBLIC_PATHS
from sdserve.config import Settings
from sdserve.jobs.queue import SharedState, StorageError


def allowed_hosts(settings: Settings) -> list[str]:
    """`--allowed-hosts`, else: any Host when `--public-url` is set (no URL is then made from the Host), else
    loopback, the bind address and this machine's own names and addresses."""
    if settings.allowed_hosts:
        return [h.lower() for h in settings.allowed_hosts]
    if settings.public_url:
        return ["*"]
    hosts = {"localhost", "127.0.0.1", "::1", settings.host.lower()}
    try:
        name = socket.gethostname()
        hosts |= {name.lower(), socket.getfqdn().lower(), *socket.gethostbyname_ex(name)[2]}
    except OSError:
        pass
    return sorted(hosts - {"0.0.0.0", "::", ""})


def host_of(header: str) -> str:
    """The host of a Host header, without its port: `[::1]:80` -> `::1`, `a.b:7860` -> `a.b`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    for pattern in allowed:
        if pattern == "*" or host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class HostGuard:
    """400, in the dialect's error shape, for a Host outside the allowed list (probes exempt)."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.allowed or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        if host_allowed(host_of(header), self.allowed):
            await self.app(scope, receive, send)
            return
        message = (f"Host {header[:100]!r} is not one this server answers to; its operator can add it with "
                   "--allowed-hosts (SDSERVE_ALLOWED_HOSTS) or set --public-url")
        await render(scope["path"], 400, message)(scope, receive, send)


def base_url(settings: Settings, request_base: str) -> str:
    """The start of an absolute URL: --public-url, else the request's (its Host passed HostGuard)."""
    return (settings.public_url or request_base).rstrip("/")


class ImageLinks:
    """Signed, expiring links to /api/v1/images/{id}.

    The secret is SDSERVE_URL_SECRET, else a random one kept in the queue's shared state (Redis, or the SQLite data
    dir), made by the first replica that needs it and read by the others (cached for SECRET_TTL_S): nothing a
    client or a reader of the keys file holds lets anyone sign."""

    SECRET_TTL_S = 300.0
    TABLE, KEY = "secrets", "image-links"

    def __init__(self, ttl_s: int, secret: bytes | None = None,
                 shared: tuple[Callable[[str], dict[str, str]], Callable[[str, str, str | None], None]] | None = None
                 ) -> None:
        self.ttl_s = ttl_s
        self._fixed = secret
        self._shared = shared
        self._cached: tuple[float, bytes] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, shared: SharedState) -> ImageLinks:
        if settings.url_secret:
            return cls(settings.image_url_ttl_s, settings.url_secret.encode())
        return cls(settings.image_url_ttl_s, shared=(shared.shared_get, shared.shared_put))

    def _secret(self) -> bytes:
        if self._fixed is not None:
            return self._fixed
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < self.SECRET_TTL_S:
            return self._cached[1]
        assert self._shared is not None
        get, put = self._shared
        stored = get(self.TABLE).get(self.KEY)
        if not stored:
            put(self.TABLE, self.KEY, secrets.token_hex(32))
            stored = get(self.TABLE)[self.KEY]  # two replicas at once: both keep what was stored last
        self._cached = (now, bytes.fromhex(stored))
        return self._cached[1]

    def _signature(self, image_id: str, expires: int) -> str:
        return hmac.new(self._secret(), f"{image_id}\0{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, base: str, image_id: str) -> str:
        expires = int(time.time()) + self.ttl_s
        return f"{base}/api/v1/images/{image_id}?expires={expires}&signature={self._signature(image_id, expires)}"

    def valid(self, image_id: str, query: QueryParams) -> bool:
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if not re.fullmatch(r"[0-9]{1,12}", expires) or not re.fullmatch(r"[0-9a-f]{64}", signature):
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(signature.encode(), self._signature(image_id, int(expires)).encode())

    def signed_image(self, scope: Scope) -> str | None:
        """The image id of a GET /api/v1/images/{id} carrying a valid signature, else None (blocking: the secret
        may be read from the store)."""
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD") or not path.startswith("/api/v1/images/"):
            return None
        query = QueryParams(scope.get("query_string", b""))
        if "signature" not in query:
            return None
        image_id = path.removeprefix("/api/v1/images/")
        try:
            return image_id if self.valid(image_id, query) else None
        except (StorageError, ValueError):  # the store is away: the link cannot be checked now
            return None
