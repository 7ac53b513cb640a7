"""Rate limits per caller (an API key, a Basic user, or with auth off the client's address):

- requests: every submission (POST, and `GET /?prompt=`) takes a token from a bucket that refills at `rate`
  per second up to `burst`;
- images: a submission of n images takes n tokens from a bucket that refills at `images_per_minute`.

Token buckets whose state lives in the shared state (`SharedState.take_tokens`, jobs/queue.py): in memory for the
embedded queue, an atomic Lua script on Redis (its own clock), so one limit holds across API replicas.
Over a limit: 429 with `Retry-After` and `RateLimit-Limit`/`-Remaining`/`-Reset`, in the dialect's error shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdserve.jobs.queue import SharedState
    from sdserve.keys import Caller


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


@dataclass(frozen=True)
class Rate:
    per_s: float
    burst: float

    @classmethod
    def parse(cls, text: str, burst: float | None = None) -> Rate:
        """`5/s`, `300/min`, `1000/h`; the burst defaults to one window's worth (at least 1)."""
        match = _RATE.match(text)
        if not match:
            raise ValueError(f"rate {text!r}: write it as COUNT/s, COUNT/min or COUNT/h, e.g. 5/s")
        count, window = float(match[1]), _SECONDS[match[2]]
        if count <= 0:
            raise ValueError(f"rate {text!r} must be above 0")
        return cls(count / window, float(burst) if burst else max(1.0, count))


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int  # the bucket's size
    remaining: int  # whole tokens left
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until this request would have fitted (0 when allowed)

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


class RateLimited(Exception):
    def __init__(self, what: str, decision: Decision) -> None:
        super().__init__(f"rate limit: too many {what} from this caller; retry in {decision.retry_after_s} s")
        self.decision = decision


def refill(tokens: float | None, elapsed_s: float, rate: Rate, n: float) -> tuple[bool, float, float]:
    """One bucket step: (allowed, tokens left, seconds until n would fit). A new bucket starts full; n more
    than the burst never fits (retry says how long a full bucket takes)."""
    level = rate.burst if tokens is None else min(rate.burst, tokens + max(0.0, elapsed_s) * rate.per_s)
    if level >= n:
        return True, level - n, 0.0
    return False, level, (min(n, rate.burst) - level) / rate.per_s


def decide(rate: Rate, allowed: bool, left: float, retry_s: float) -> Decision:
    return Decision(allowed, int(rate.burst), int(left), math.ceil((rate.burst - left) / rate.per_s),
                    0 if allowed else max(1, math.ceil(retry_s)))


class Limiter:
    """The limits of one server: its defaults, which a key's own limits (keys file) replace; the buckets are in
    the shared state every replica reads (`SharedState.take_tokens`)."""

    def __init__(self, store: SharedState, requests: Rate | None = None, images: Rate | None = None) -> None:
        self.store = store
        self.requests = requests
        self.images = images

    def _take(self, kind: str, rate: Rate, caller: Caller, n: float) -> Decision:
        allowed, left, retry = self.store.take_tokens(f"ratelimit:{kind}:{caller.id}", rate.per_s, rate.burst, n)
        return decide(rate, allowed, left, retry)

    def request_rate(self, caller: Caller) -> Rate | None:
        """The caller's submission rate (its key's own, else the server's); None: not limited."""
        return caller.requests or self.requests

    def request(self, caller: Caller) -> Decision | None:
        rate = self.request_rate(caller)
        return None if rate is None else self._take("requests", rate, caller, 1)

    def charge_images(self, caller: Caller | None, n: int) -> None:
        """Charge n images to the caller; RateLimited when over the images limit."""
        rate = None if caller is None else caller.images or self.images
        if rate is None or caller is None:
            return
        decision = self._take("images", rate, caller, n)
        if not decision.allowed:
            raise RateLimited("images", decision)
