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
import secrets
import socket
import time
from collections.abc import Iterable

from starlette.datastructures import QueryParams
from starlette.types import ASGIApp, Receive, Scope, Send

from sdserve.api.errors import render
from sdserve.api.security import PUBLIC_PATHS
from sdserve.config import Settings


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
    """Signed, expiring links to /api/v1/images/{id}."""

    def __init__(self, secret: bytes, ttl_s: int) -> None:
        self.secret = secret
        self.ttl_s = ttl_s

    @classmethod
    def for_settings(cls, settings: Settings, key_digests: Iterable[str]) -> ImageLinks:
        """--url-secret; else derived from every credential the server accepts, so replicas configured alike agree
        and nobody holding fewer than all of them can sign. With auth off, a per-process secret (every caller may
        read every image then anyway)."""
        if settings.url_secret:
            secret = settings.url_secret.encode()
        else:
            material = sorted([*key_digests, *(hashlib.sha256(u.encode()).hexdigest() for u in settings.api_auth)])
            secret = (hashlib.sha256(("sdserve image links\0" + "\0".join(material)).encode()).digest()
                      if material else secrets.token_bytes(32))
        return cls(secret, settings.image_url_ttl_s)

    def _signature(self, image_id: str, expires: int) -> str:
        return hmac.new(self.secret, f"{image_id}\0{expires}".encode(), hashlib.sha256).hexdigest()

    def url(self, base: str, image_id: str) -> str:
        expires = int(time.time()) + self.ttl_s
        return f"{base}/api/v1/images/{image_id}?expires={expires}&signature={self._signature(image_id, expires)}"

    def valid(self, image_id: str, query: QueryParams) -> bool:
        expires, signature = query.get("expires", ""), query.get("signature", "")
        if not expires.isdigit() or len(expires) > 12 or int(expires) < time.time():
            return False
        return hmac.compare_digest(signature, self._signature(image_id, int(expires)))

    def signed_image(self, scope: Scope) -> str | None:
        """The image id of a GET /api/v1/images/{id} carrying a valid signature, else None."""
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD") or not path.startswith("/api/v1/images/"):
            return None
        image_id = path.removeprefix("/api/v1/images/")
        return image_id if self.valid(image_id, QueryParams(scope.get("query_string", b""))) else None
