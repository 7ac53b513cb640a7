"""Job events: what they hold (built here only) and the bus every backend provides (SSE, synchronous waits, metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol, TypedDict

from sdserve.core import public_job
from sdserve.schema import FINAL_STATUSES, Job

# ----- the events, built here only ------------------------------------------------------------------------
# On the wire (SSE data, the Redis stream) an event is a JSON object.
EventType = Literal["queued", "started", "progress", "preview", "succeeded", "failed", "canceled"]
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


class Preview(TypedDict):
    """A step preview as the engine's finisher encodes it (engine/previews.py): small, never a result."""

    image: str  # base64
    media_type: str
    width: int
    height: int


class PreviewEvent(Preview):
    """The forming picture of a running job, sent every `preview_every` steps to the job's watchers only."""

    type: Literal["preview"]
    id: str
    status: Literal["running"]
    step: int
    steps: int


# What subscribers get; a backend that keeps events adds `event_id` (SSE's id, for Last-Event-ID).
Event = dict[str, Any]


def job_event(kind: EventType, job: Job) -> Event:
    """A job's state changed (queued, started, or its end): the type, then the job as every API reports it."""
    return {"type": kind, **public_job(job)}


def progress_event(job_id: str, step: int, steps: int, eta_s: float | None) -> Event:
    event: ProgressEvent = {"type": "progress", "id": job_id, "status": "running", "step": step, "steps": steps,
                            "progress": step / steps if steps else 0.0, "eta_s": eta_s}
    return event  # type: ignore[return-value]  (a TypedDict is a dict on the wire)


def preview_event(job_id: str, step: int, steps: int, preview: Preview) -> Event:
    event: PreviewEvent = {"type": "preview", "id": job_id, "status": "running", "step": step, "steps": steps,
                           **preview}
    return event  # type: ignore[return-value]


class EventBus(Protocol):
    """Job events, every backend: the SQLite store's table (jobs/local.py) or a Redis stream per job
    (jobs/redis.py). Any process publishes and subscribes; a subscriber can resume after an event id."""

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Called for every event this process sees (metrics, the job log)."""

    def subscribe(self, job_id: str, types: frozenset[str] | None = None,
                  after: str | None = None) -> AbstractContextManager[asyncio.Queue[Event]]:
        """Subscribe before reading the job's current state, so no event slips between the two. `types` limits
        the events delivered (e.g. only the end); `after`: resume after this event id, else from now."""
