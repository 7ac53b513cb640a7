"""The job queue and job store interface. Embedded: `jobs.local` (SQLite, the processes of one host). Scale-out: `jobs.redis` (sorted sets,
Lua scripts for the atomic steps, and a Redis Stream of events per job).

Order is priority first (higher first), then, across callers, fair share (jobs/fairshare.py), and within
one caller first-in-first-out. A claimed job is `running`;
a job's end is recorded once: finishing a job that already ended changes nothing and returns it.
A claimed job is leased to its worker, which renews the lease while it runs; if the worker dies, `recover()`
(from `expire()`, which every API process and worker calls periodically) puts the job back in the queue, up to
`MAX_ATTEMPTS` deliveries, after which it fails with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from sdserve.jobs import policy
from sdserve.jobs.events import Event, EventBus, Preview
from sdserve.schema import ImageRef, Job, JobRequest, JobStatus
from sdserve.webhooks import Outbox

MAX_ATTEMPTS = 3

# Given the queued jobs in order (head first), the runner picks which to claim together.
Selector = Callable[[Sequence[Job]], Sequence[Job]]


class QueueError(Exception):
    pass


class QueueFull(QueueError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotAccepting(QueueError):
    """The server is shutting down or not ready: try again later, maybe on another replica."""


class ShuttingDown(NotAccepting):
    """The server began shutting down while a synchronous call waited: 503 with Retry-After, in its dialect's shape
    (its jobs are canceled: the client is told to try again, on this server once it is back or on another)."""


class JobNotFound(QueueError, LookupError):
    pass


class IdempotencyConflict(QueueError):
    pass


class JobFinished(QueueError):
    """The job already ended; it cannot be canceled."""


class StorageError(QueueError):
    """The job store cannot write (disk full, read-only, I/O error): nothing was changed."""

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(message)
        self.full = full  # out of space: 507 rather than 503


class Stops(NamedTuple):
    """What one step's `progress` call found among the batch's jobs."""

    canceled: set[str]  # cancellation was requested: the runner ends them canceled
    # No longer this batch's to finish: it ended meanwhile (the reaper timed it out), or its lease ran out (the
    # job store was away) and another worker holds it now. The runner drops it without recording anything.
    lost: set[str]


class JobEnds:
    """How a job ends, the same for every backend: each backend provides `_finish` (record the end once,
    publish its event) and inherits these."""

    def _finish(self, job_id: str, status: JobStatus, **fields: Any) -> Job:
        raise NotImplementedError

    def succeed(self, job_id: str, images: list[ImageRef]) -> Job:
        return self._finish(job_id, JobStatus.succeeded, images=json.dumps([i.model_dump() for i in images]))

    def fail(self, job_id: str, error: str, kind: str = "internal") -> Job:
        return self._finish(job_id, JobStatus.failed, error=error, error_kind=kind)

    def mark_canceled(self, job_id: str) -> Job:
        return self._finish(job_id, JobStatus.canceled, error="canceled", error_kind="canceled")

    def end_past_deadline(self, job_id: str, cancel_after_s: float | None, created: float, deadline: float,
                          status: str) -> Job:
        """The job's deadline passed (`status`: where it was then): failed with a timeout, or canceled when the
        deadline was its cancel-after (policy.past_deadline)."""
        ended, error, kind = policy.past_deadline(cancel_after_s, created, deadline, status)
        return self._finish(job_id, JobStatus(ended), error=error, error_kind=kind)


class SharedState(Protocol):
    """What every replica and worker shares besides the jobs: small tables, token buckets and the worker registry.
    A1111's options and calls, the rate limiter, signed links and the model catalog depend on this alone."""

    def shared_get(self, table: str) -> dict[str, str]:
        """Small state every replica shares (A1111 options, the A1111 calls in flight): a table of strings."""

    def shared_put(self, table: str, key: str, value: str | None) -> None:
        """Set a key of a shared table; None removes it."""

    def take_tokens(self, bucket: str, rate: float, burst: float, n: float) -> tuple[bool, float, float]:
        """Atomically take n tokens from a token bucket every replica shares (refilling at `rate` per second up
        to `burst`; a new bucket starts full): (taken, tokens left, seconds until n would fit)."""

    def register_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        """A worker says it is alive (name, model, device, current batch); it counts as live for `ttl_s`."""

    def workers(self) -> list[dict[str, Any]]:
        """The live workers, each with its `last_heartbeat` (unix time)."""

    def drop_worker(self, name: str) -> None:
        """A worker is gone (it stopped, or its supervisor saw it die): no longer listed, before its ttl."""


class JobQueue(SharedState, Outbox, Protocol):
    """The job store. Each backend also holds the shared state (`SharedState`) and the webhook outbox
    (`webhooks.Outbox`), in the same database."""

    events: EventBus
    accepting: bool

    def submit(
        self, request: JobRequest, *, source: str = "native", idempotency_key: str | None = None,
        fingerprint: str | None = None, timeout_s: float | None = None, owner: str = "", label: str | None = None,
        weight: float = 1.0,
    ) -> tuple[Job, bool]:
        """Persist and enqueue; returns (job, created). Raises QueueFull, NotAccepting, IdempotencyConflict,
        StorageError. With an idempotency key already used for the same fingerprint: that job, not created.
        `owner` and `weight`: the caller's fair-share turn (jobs/fairshare.py); `label`: what the job shows."""

    def idempotent(self, idempotency_key: str, fingerprint: str | None) -> Job | None:
        """The job submitted with this key, or None; IdempotencyConflict if it had another fingerprint."""

    def ping(self) -> None:
        """Raise StorageError when the job store cannot be reached."""

    def get(self, job_id: str) -> Job: ...

    def list(self, *, limit: int = 50, offset: int = 0, status: str | None = None,
             owner: str | None = None) -> list[Job]:
        """Newest first; `owner`: only that caller's jobs."""

    def cancel(self, job_id: str, running: bool = True) -> Job:
        """Queued: canceled now. Running: flagged, and the runner stops it at its next step; with `running`
        False a running job is left to finish (atomically: a job claimed meanwhile is not touched)."""

    def depth(self) -> int: ...

    def retry_after_s(self) -> int: ...

    # --- runner side ---
    def claim(
        self, select: Selector | None = None, wait_s: float = 0.5, linger_s: float = 0.0,
        full: Callable[[Sequence[Job]], bool] | None = None, worker: str | None = None,
    ) -> list[Job]:
        """Atomically move the selected queued jobs (default: the head) to running, as one batch, leased to
        `worker`."""

    def heartbeat(self, job_ids: Sequence[str]) -> None:
        """Extend the lease of jobs this worker is running."""

    def canceled(self, job_ids: Sequence[str]) -> set[str]:
        """Those of these running jobs whose cancellation was requested (one round trip)."""

    def deadlines(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        """Each job's unix time after which it fails with a timeout, or None (one round trip)."""

    def progress(self, job_ids: Sequence[str], step: int, steps: int, batch_id: str | None = None,
                 previews: Mapping[str, Preview] | None = None) -> Stops:
        """One denoising step of batch `batch_id`: record each job's progress (and tell its watchers), and return
        the jobs to stop (`Stops`), whose progress is not recorded. Few round trips on Redis: the runner calls it
        on every step, between two UNet passes. `previews`: the jobs' pictures due at this step, each kept as the
        job's latest (`latest_preview`, until it ends) and sent as a `preview` event."""

    def latest_preview(self, job_id: str) -> Event | None:
        """A running job's last preview event, or None (none yet, or the job ended: previews are never kept)."""

    def succeed(self, job_id: str, images: list[ImageRef]) -> Job: ...

    def fail(self, job_id: str, error: str, kind: str = "internal") -> Job: ...

    def mark_canceled(self, job_id: str) -> Job: ...

    def requeue(self, job_id: str) -> None:
        """Back to the queue without counting an attempt (graceful shutdown)."""

    def recover(self) -> int: ...

    def expire(self) -> list[Job]: ...

    def record_speed(self, seconds_per_step: float) -> None: ...

    def prune(self, finished_before: float, limit: int = 1000) -> int:
        """Retention: delete up to `limit` jobs that ended before this unix time (their records, idempotency
        keys and events); returns how many. Their images are the image store's to prune (by age)."""
