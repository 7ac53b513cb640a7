"""In-process pub/sub of job events, from the runner thread to async HTTP handlers (SSE, sync waits)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from sdserve.core import public_job
from sdserve.schema import FINAL_STATUSES, Job

log = logging.getLogger(__name__)

# ----- the events, built here only ------------------------------------------------------------------------
# On the wire (SSE data, the Redis stream) an event is a JSON object.
EventType = Literal["queued", "started", "progress", "succeeded", "failed", "canceled"]
END_EVENTS = frozenset(status.value for status in FINAL_STATUSES)  # a job's last event


class ProgressEvent(TypedDict):
    """One denoising step of a running job."""

    type: Literal["progress"]
    id: str
    status: Literal["running"]
    step: int
    steps: int
    progress: float
    eta_s: float | None  # jobs/policy.py: running_eta


# What subscribers get; a backend that keeps events adds `event_id` (SSE's id, for Last-Event-ID).
Event = dict[str, Any]


def job_event(kind: EventType, job: Job) -> Event:
    """A job's state changed (queued, started, or its end): the type, then the job as every API reports it."""
    return {"type": kind, **public_job(job)}


def progress_event(job_id: str, step: int, steps: int, eta_s: float | None) -> Event:
    event: ProgressEvent = {"type": "progress", "id": job_id, "status": "running", "step": step, "steps": steps,
                            "progress": step / steps if steps else 0.0, "eta_s": eta_s}
    return event  # type: ignore[return-value]  (a TypedDict is a dict on the wire)


@dataclass(eq=False)
class _Subscription:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    types: frozenset[str] | None


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[_Subscription]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Called synchronously, in the publishing thread, for every event of every job (metrics, logs)."""
        self._listeners.append(listener)

    def publish(self, job_id: str, event: Event) -> None:
        """Thread-safe: called from the runner thread or the event loop."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break the job
                log.exception("event listener failed")
        with self._lock:
            targets = [s for s in self._subscribers.get(job_id, ()) if s.types is None or event["type"] in s.types]
        for sub in targets:
            try:
                # Each wake-up of the event loop from the runner thread costs a GIL hand-off, so only
                # subscribers that asked for this type of event are woken.
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, event)
            except RuntimeError:  # the subscriber's loop is closed: it went away
                pass

    @contextmanager
    def subscribe(self, job_id: str, types: frozenset[str] | None = None,
                  after: str | None = None) -> Iterator[asyncio.Queue[Event]]:
        """Subscribe before reading the job's current state, so no event slips between the two.

        `types` limits the events delivered (e.g. only the end); None delivers all. `after` (an event id to
        resume from) is for backends that keep events; this one keeps none, and delivers from now.
        """
        entry = _Subscription(asyncio.get_running_loop(), asyncio.Queue(), types)
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(entry)
        try:
            yield entry.queue
        finally:
            with self._lock:
                subs = self._subscribers.get(job_id)
                if subs is not None:
                    subs.discard(entry)
                    if not subs:
                        del self._subscribers[job_id]
