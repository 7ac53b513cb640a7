"""Webhooks: a job's events POSTed to the URL its submission named, signed as Standard Webhooks specifies
(`webhook-id`, `webhook-timestamp`, `webhook-signature`: HMAC-SHA256 of `id.timestamp.body`), at least once.

The outbox lives in the job store (jobs/local.py, jobs/redis.py), not in a process's memory: a delivery is queued
by the same step that records the event (a job's end atomically with it), so a crash, a kill -9 or a restart of
any process loses none. Every API process runs a `Dispatcher`, which claims due deliveries with a lease (two
replicas never send one at the same time), POSTs them and retries with backoff for RETRY_FOR_S. Each attempt is
logged per job (GET /api/v1/jobs/{id}/webhooks).

Security: a delivery goes only to a public address. The host is resolved, every address it resolves to is
checked (no loopback, private, link-local, metadata, multicast or reserved address), and the connection goes to
the checked address (no second lookup a rebinding DNS could answer differently). Hosts named in
--webhook-allow-hosts may resolve anywhere. Redirects are not followed.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

WebhookEvent = Literal["queued", "started", "progress", "completed", "failed", "canceled"]
EVENTS: tuple[str, ...] = ("queued", "started", "progress", "completed", "failed", "canceled")
DEFAULT_EVENTS: tuple[str, ...] = ("completed", "failed", "canceled")
# A job event's type -> the webhook event it is (previews are never sent).
_NAMES = {"queued": "queued", "started": "started", "progress": "progress", "succeeded": "completed",
          "failed": "failed", "canceled": "canceled"}

PROGRESS_EVERY_S = 2.0  # progress deliveries of one job: at most one per this, with its latest step
RETRY_FOR_S = 3600.0  # a delivery that keeps failing is given up after this long
TIMEOUT_S = 10.0  # one step of an attempt (connect, send, each read)
ATTEMPT_S = 15.0  # one attempt, whole: past it, it counts as failed and is tried again later
LEASE_S = 60.0  # a claimed delivery is another dispatcher's to try after this (its claimer died): > ATTEMPT_S
POLL_S = 0.25  # how often a dispatcher looks for due deliveries
BATCH = 8  # deliveries a dispatcher sends at once, each on a thread of its own (one slow receiver holds one)
RELEASE_S = 5.0  # a delivery this replica cannot sign (no secret for its key) is left to others this long
LOG_KEEP = 100  # attempts kept per job
SECRET_PREFIX = "whsec_"


def _backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: 1, 2, 4, ... up to 5 minutes."""
    return min(300.0, 2.0 ** max(0, attempts - 1))


# ----- what a submission asks for ------------------------------------------------------------------------------
def check_url(url: str) -> str:
    """A webhook URL as a submission may give it: absolute http(s), a host, no credentials in it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook_url must be an absolute http:// or https:// URL")
    try:
        ascii_host(parts.hostname)
    except ValueError:
        raise ValueError(f"webhook_url host {parts.hostname!r} is not a valid host name") from None
    if parts.username is not None or parts.password is not None:
        raise ValueError("webhook_url must not hold credentials (user:password@)")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("webhook_url has an invalid port") from None
    return url


def ascii_host(host: str) -> str:
    """The host as DNS, TLS and the Host header know it: an address as is, a name in IDNA (punycode)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:  # a label too long or empty, a character IDNA refuses
        raise ValueError(str(exc)) from None


def spec(url: str | None, events: Sequence[str]) -> str | None:
    """What the job store keeps with a job (JSON), or None without a webhook."""
    return None if url is None else json.dumps({"url": url, "events": list(events)})


def event_name(job_event_type: str) -> str | None:
    """The webhook event a job event (or a final status) is: succeeded -> completed; None for previews."""
    return _NAMES.get(job_event_type)


def wanted(spec_json: str | None, job_event_type: str) -> str | None:
    """The webhook event a job event is, if the job's webhook asked for it."""
    name = event_name(job_event_type)
    if name is None or not spec_json:
        return None
    return name if name in json.loads(spec_json)["events"] else None


def check_secret(secret: str) -> str:
    """A Standard Webhooks secret: `whsec_` and the base64 of at least 16 random bytes (what a receiver's
    `standardwebhooks.Webhook(secret)` verifies with)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret is whsec_ followed by base64 (e.g. whsec_$(openssl rand -base64 32))")
    try:
        raw = base64.b64decode(secret[len(SECRET_PREFIX):] + "==", validate=False)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(raw) < 16:
        raise ValueError("a webhook secret needs at least 16 bytes after whsec_ (base64 of 24+ characters)")
    return secret


# ----- where a delivery may go ---------------------------------------------------------------------------------
class Blocked(Exception):
    """The webhook's host is not a public address and not allowed by name."""


# IPv6 ranges that carry an IPv4 address a gateway may reach (NAT64, 6to4, Teredo, IPv4-compatible): refused
# whole, since the address inside may be a private one.
_TUNNELS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32",
                                                    "::/96"))


def public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif any(ip in net for net in _TUNNELS):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback
                                 or ip.is_private or ip.is_unspecified)


def allowed_by_name(host: str, allow_hosts: Sequence[str]) -> bool:
    return host.lower().rstrip(".") in {h.lower().rstrip(".") for h in allow_hosts}


def literal_blocked(url: str, allow_hosts: Sequence[str]) -> str | None:
    """Why a URL whose host is an address (or `localhost`) would never be delivered to, at submission: the
    client is told at once. Names are resolved, and checked, at each delivery."""
    host = urlsplit(url).hostname or ""
    if allowed_by_name(host, allow_hosts):
        return None
    if host.lower().rstrip(".") == "localhost" or host.lower().endswith(".localhost"):
        return f"webhook_url host {host!r} is this machine; deliveries go only to public addresses"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if not public(host):
        return (f"webhook_url host {host} is not a public address; deliveries go only to public addresses "
                "(the operator can allow a host by name with --webhook-allow-hosts)")
    return None


def resolve(host: str, port: int, allow_hosts: Sequence[str]) -> str:
    """The address to connect to: every address the host resolves to must be public, unless it is allowed."""
    try:
        infos = socket.getaddrinfo(ascii_host(host), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        raise Blocked(f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
    addresses = [info[4][0] for info in infos]
    if not allowed_by_name(host, allow_hosts):
        bad = [a for a in addresses if not public(a)]
        if bad:
            raise Blocked(f"{host} resolves to {bad[0]}, which is not a public address (allow it by name with "
                          "--webhook-allow-hosts)")
    return addresses[0]


# ----- the outbox, as the job store holds it ---------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """One message to send: a job's event (for progress, its step), claimed by a dispatcher."""

    key: str  # the outbox entry: <job id>:<event>
    job_id: str
    event: str
    attempts: int  # including the one now claimed
    first_at: float
    step: int | None = None

    @property
    def message_id(self) -> str:
        """Standard Webhooks' webhook-id: the same on every retry of one message."""
        suffix = f"_{self.step}" if self.event == "progress" and self.step is not None else ""
        return f"msg_{self.job_id}_{self.event}{suffix}"


class Outbox(Protocol):
    """What the job store provides for webhooks (both backends)."""

    def claim_webhooks(self, limit: int, lease_s: float) -> list[Delivery]:
        """Up to `limit` due deliveries, leased to this caller for `lease_s` (their attempt counted)."""

    def webhook_attempted(self, delivery: Delivery, record: dict[str, Any], retry_at: float | None) -> None:
        """Log an attempt; then the delivery is done (None) or due again at `retry_at`."""

    def webhook_release(self, delivery: Delivery, due: float) -> None:
        """Give a claimed delivery back untried (its attempt not counted), due again at `due`."""

    def webhook_log(self, job_id: str) -> list[dict[str, Any]]:
        """A job's delivery attempts, oldest first."""


# ----- sending -----------------------------------------------------------------------------------------------
def payload(delivery: Delivery, job: Any) -> dict[str, Any]:
    """The body: Standard Webhooks' recommended shape {type, timestamp, data}."""
    from sdserve.core import public_job

    if delivery.event == "progress":
        steps = job.steps or job.request.steps
        step = delivery.step if delivery.step is not None else job.step
        data: dict[str, Any] = {"id": job.id, "status": job.status.value, "step": step, "steps": steps,
                                "progress": step / steps if steps else 0.0}
    else:
        data = public_job(job)
    return {"type": f"job.{delivery.event}", "timestamp": datetime.now(timezone.utc).isoformat(), "data": data}


def signed_headers(secret: str, message_id: str, body: bytes, at: datetime) -> dict[str, str]:
    from standardwebhooks.webhooks import Webhook

    return {"webhook-id": message_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": Webhook(secret).sign(message_id, at, body), "content-type": "application/json",
            "user-agent": "sdserve-webhooks"}


class Dispatcher:
    """Sends the outbox's due deliveries, from a thread of its own, in every API process."""

    def __init__(self, queue: Any, secret_for: Callable[[str], str | None], allow_hosts: Sequence[str],
                 on_attempt: Callable[[str, str], None] | None = None) -> None:
        self.queue = queue
        self.on_attempt = on_attempt  # (event, delivered | retrying | given_up): the metric
        self.secret_for = secret_for  # a job's owner -> the secret its deliveries are signed with
        self.allow_hosts = list(allow_hosts)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdserve-webhooks", daemon=True)
        self._client: Any = None

    def start(self) -> None:
        import httpx

        # trust_env off: no proxy from the environment carries a delivery around the address check. No kept-alive
        # connections: one to an address is never reused for another host that resolves to it.
        self._client = httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False,
                                    limits=httpx.Limits(max_keepalive_connections=0))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(ATTEMPT_S + 5)
        if self._client is not None:
            self._client.close()

    def _loop(self) -> None:
        from sdserve.jobs.queue import StorageError

        while not self._stop.is_set():
            try:
                due = self.queue.claim_webhooks(BATCH, LEASE_S)
            except StorageError:
                due = []  # the job store is away: the deliveries wait there
            except Exception:
                log.exception("webhook outbox")
                due = []
            threads = [threading.Thread(target=self._deliver_logged, args=(d,), name="sdserve-webhook", daemon=True)
                       for d in due]
            for thread in threads:
                thread.start()
            for thread in threads:  # each attempt is bounded (ATTEMPT_S), and so is this wait
                thread.join()
            if not due:
                self._stop.wait(POLL_S)

    def _deliver_logged(self, delivery: Delivery) -> None:
        try:
            self.deliver(delivery)
        except Exception:  # the store failed recording it: its lease runs out and it is tried again
            log.exception("webhook delivery %s", delivery.message_id)

    def deliver(self, delivery: Delivery) -> None:
        from sdserve.jobs.queue import JobNotFound

        try:
            job = self.queue.get(delivery.job_id)
        except JobNotFound:  # pruned meanwhile: nothing left to tell
            self.queue.webhook_attempted(delivery, self._record(delivery, None, "the job no longer exists"), None)
            return
        if delivery.event == "progress" and job.status.terminal:
            return self.queue.webhook_attempted(delivery, self._record(delivery, None, "skipped: the job ended"),
                                                None)
        url = job.request.webhook_url
        secret = self.secret_for(job.owner)
        status, error = None, None
        if secret is None and url and time.time() - delivery.first_at <= RETRY_FOR_S:
            # not this replica's to sign (no secret for the job's key here): left to one that has it
            return self.queue.webhook_release(delivery, time.time() + RELEASE_S)
        if not url:
            error = "the job has no webhook_url"
        elif secret is None:
            error = "no replica could sign it (--webhook-secret, or the key's webhook_secret)"
        else:  # whatever the receiver or its name did comes back as the error: recorded, tried again with backoff
            status, error = self._bounded_post(url, secret, delivery, job)
        delivered = status is not None and 200 <= status < 300
        retry_at = None
        if not delivered and secret is not None and url:
            retry = time.time() + _backoff(delivery.attempts)
            if retry - delivery.first_at <= RETRY_FOR_S:
                retry_at = retry
        record = self._record(delivery, status, error, retry_at, delivered)
        if not delivered:
            log.warning("webhook %s for job %s: %s%s", delivery.event, delivery.job_id, error or status,
                        "" if retry_at else " (given up)")
        self.queue.webhook_attempted(delivery, record, retry_at)
        if self.on_attempt is not None:
            self.on_attempt(delivery.event, "delivered" if delivered else "retrying" if retry_at else "given_up")

    def _bounded_post(self, url: str, secret: str, delivery: Delivery, job: Any) -> tuple[int | None, str | None]:
        """`_post`, bounded to ATTEMPT_S whatever the receiver does (a slow answer, a slow name lookup): past it the
        attempt counts as failed, and its thread is left to end on its own timeouts."""
        outcome: list[tuple[int | None, str | None]] = []

        def attempt() -> None:
            try:
                outcome.append(self._post(url, secret, delivery, job))
            except Exception as exc:
                outcome.append((None, f"{type(exc).__name__}: {exc}"))

        thread = threading.Thread(target=attempt, name="sdserve-webhook-post", daemon=True)
        thread.start()
        thread.join(ATTEMPT_S)
        return outcome[0] if outcome else (None, f"no answer within {ATTEMPT_S:g} s")

    def _post(self, url: str, secret: str, delivery: Delivery, job: Any) -> tuple[int | None, str | None]:
        import httpx

        parts = urlsplit(url)
        host = ascii_host(parts.hostname or "")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            address = resolve(host, port, self.allow_hosts)
        except Blocked as exc:
            return None, f"blocked: {exc}"
        netloc = f"[{address}]" if ":" in address else address
        target = urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path or "/", parts.query, ""))
        body = json.dumps(payload(delivery, job), separators=(",", ":")).encode()
        headers = signed_headers(secret, delivery.message_id, body, datetime.now(timezone.utc))
        bracketed = f"[{host}]" if ":" in host else host
        headers["host"] = bracketed if parts.port is None else f"{bracketed}:{parts.port}"
        try:
            response = self._client.post(target, content=body, headers=headers,
                                         extensions={"sni_hostname": host} if parts.scheme == "https" else {})
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        if 300 <= response.status_code < 400:
            return response.status_code, f"answered {response.status_code} (redirects are not followed)"
        if response.status_code >= 400:
            return response.status_code, f"answered {response.status_code}"
        return response.status_code, None

    @staticmethod
    def _record(delivery: Delivery, status: int | None, error: str | None, retry_at: float | None = None,
                delivered: bool = False) -> dict[str, Any]:
        return {"id": delivery.message_id, "event": delivery.event, "attempt": delivery.attempts,
                "at": datetime.now(timezone.utc).isoformat(), "status_code": status, "error": error,
                "delivered": delivered,
                "next_attempt_at": datetime.fromtimestamp(retry_at, timezone.utc).isoformat() if retry_at else None}
