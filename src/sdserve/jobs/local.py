"""Embedded job queue and store: one SQLite table in WAL mode, in the data dir.

Every accepted job is committed before `submit` returns, so a crash or restart loses none.
Progress (step/steps) lives in memory: it is only meaningful while this process runs the job.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdserve.jobs import fairshare, policy
from sdserve.jobs.events import EventBus, job_event, progress_event
from sdserve.jobs.queue import (
    MAX_ATTEMPTS,
    IdempotencyConflict,
    JobEnds,
    JobFinished,
    JobNotFound,
    NotAccepting,
    QueueFull,
    Selector,
    Stops,
    StorageError,
)
from sdserve.ratelimit import Rate, refill
from sdserve.schema import FINAL_STATUSES, ImageRef, Job, JobRequest, JobStatus

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    work INTEGER NOT NULL,  -- denoising steps x images: what the queue estimates time from
    request TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at REAL NOT NULL,
    deadline REAL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_kind TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    idem_key TEXT UNIQUE,
    idem_hash TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    batch_id TEXT,
    batch_images INTEGER,
    worker TEXT,
    owner TEXT NOT NULL DEFAULT '',  -- the caller (keys.Caller.id): whose fair-share turn it is
    label TEXT,  -- the caller's label, shown in the job and metrics
    weight REAL NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority DESC, seq);
CREATE TABLE IF NOT EXISTS shared (tbl TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (tbl, key));
"""


_FINAL = ", ".join(f"'{status.value}'" for status in sorted(FINAL_STATUSES))  # SQL: the final statuses


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def _storage_error(exc: sqlite3.Error) -> StorageError:
    text = str(exc)
    full = "full" in text or getattr(exc, "sqlite_errorcode", None) == 13 or (
        isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC)
    return StorageError(f"the job store cannot write: {text}", full=full)


class SQLiteJobQueue(JobEnds):
    def __init__(
        self, path: Path, *, max_queue: int = 256, default_timeout_s: float | None = None,
        events: EventBus | None = None,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.events = events or EventBus()
        self.max_queue = max_queue
        self.default_timeout_s = default_timeout_s
        self.accepting = True
        self.shared = False  # one process: its events and recovery at start-up are in-process
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a committed job survives a process crash or kill; only a power cut
        # could lose the last moments. FULL would fsync every submission.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._migrate()
        self._lock = threading.RLock()
        self._buckets: dict[str, tuple[float, float]] = {}  # rate-limit buckets: name -> (tokens, monotonic time)
        self._wakeup = threading.Condition(self._lock)
        self._progress: dict[str, tuple[int, int]] = {}
        self._cancel: set[str] = set()
        self._seconds_per_step: float | None = None
        self._workers: dict[str, dict[str, Any]] = {}  # this process's runner: the only worker of this queue
        self._passes: dict[str, float] = {}  # fair share (jobs/fairshare.py): each caller's pass, and the
        self._vt = 0.0  # virtual time
        # Queued jobs per priority: (count, work). Kept in step with the table so that a submission's
        # position and the queue-full check cost O(priorities), not a scan of the queue.
        self._queued: dict[int, list[int]] = {}
        self._recount()

    def _migrate(self) -> None:
        """Columns added after the first release of the table: add them to an older jobs.db in place."""
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("batch_id", "TEXT"), ("batch_images", "INTEGER"), ("worker", "TEXT"),
                             ("owner", "TEXT NOT NULL DEFAULT ''"), ("label", "TEXT"),
                             ("weight", "REAL NOT NULL DEFAULT 1")):
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        # Fair share reads each caller's oldest queued job; retention the oldest ended ones.
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (status, priority, owner, seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owned ON jobs (owner, seq)")  # a caller's own, listed
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL")

    def _recount(self) -> None:
        self._queued = {
            prio: [count, work] for prio, count, work in self._db.execute(
                "SELECT priority, COUNT(*), SUM(work) FROM jobs WHERE status = 'queued' GROUP BY priority")
        }

    def _count(self, priority: int, work: int, sign: int) -> None:
        entry = self._queued.setdefault(priority, [0, 0])
        entry[0] += sign
        entry[1] += sign * work

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        """The file is in this process: reachable while the process runs (writes are checked by WriteHealth)."""

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction: all of it is committed, or none of it (a full disk rolls it back). Callers change
        the in-memory counts only after it commits, so they never drift from the table."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _storage_error(exc) from None
            try:
                yield
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise _storage_error(exc) from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (it does on SQLITE_FULL)

    # ----- reading ---------------------------------------------------------------------------
    def _row(self, job_id: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return row

    def _to_job(self, row: sqlite3.Row, with_position: bool = True) -> Job:
        status = JobStatus(row["status"])
        request = JobRequest.model_validate_json(row["request"])
        step, steps = self._progress.get(row["id"], (0, request.steps))
        if status is JobStatus.succeeded:
            step = steps
        position = eta = None
        if status is JobStatus.queued and with_position:
            position = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > ? OR (priority = ? AND seq < ?))",
                (row["priority"], row["priority"], row["seq"]),
            ).fetchone()[0]
            eta = self._queued_eta(position, row["work"])
        elif status is JobStatus.running:
            eta = policy.running_eta(steps, step, row["batch_images"] or request.n, self._seconds_per_step)
        return Job(
            id=row["id"],
            status=status,
            request=request,
            source=row["source"],
            queue_position=position,
            progress=(step / steps) if steps else (1.0 if status is JobStatus.succeeded else 0.0),
            step=step,
            steps=steps,
            eta_s=eta,
            created_at=_ts(row["created_at"]),
            started_at=_ts(row["started_at"]),
            finished_at=_ts(row["finished_at"]),
            attempts=row["attempts"],
            error=row["error"],
            error_kind=row["error_kind"],
            images=[ImageRef(**i) for i in json.loads(row["images"])],
            batch_id=row["batch_id"],
            batch_images=row["batch_images"],
            worker=row["worker"],
            label=row["label"],
            owner=row["owner"] or "",
        )

    def _queued_eta(self, position: int, work: float) -> float | None:
        depth = sum(count for count, _ in self._queued.values())
        queued_work = sum(w for _, w in self._queued.values())
        return policy.queued_eta(position, depth, queued_work, self._running_left(), work, self._seconds_per_step)

    def _running_left(self) -> float:
        """The image-steps the running jobs have left (all of a job's work until its first step)."""
        left = 0.0
        for r in self._db.execute("SELECT id, work FROM jobs WHERE status = 'running'").fetchall():
            step, steps = self._progress.get(r["id"], (0, 1))
            left += policy.work_left(r["work"], steps, step)
        return left

    def get(self, job_id: str) -> Job:
        with self._lock:
            return self._to_job(self._row(job_id))

    def list(self, *, limit: int = 50, offset: int = 0, status: str | None = None,
             owner: str | None = None) -> list[Job]:
        where = [clause for clause, value in (("status = ?", status), ("owner = ?", owner)) if value is not None]
        args = [value for value in (status, owner) if value is not None]
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY seq DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            return [self._to_job(r) for r in rows]

    def depth(self) -> int:
        with self._lock:
            return sum(count for count, _ in self._queued.values())

    # ----- client side -----------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """A guess at when a slot frees up: the queue's work at the measured speed, within 1..300 s."""
        with self._lock:
            queued_work = sum(w for _, w in self._queued.values())
        return policy.retry_after_s(queued_work, self._seconds_per_step, self.max_queue)

    def idempotent(self, idempotency_key: str, fingerprint: str | None) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE idem_key = ?", (idempotency_key,)).fetchone()
            if row is None:
                return None
            if row["idem_hash"] != fingerprint:
                raise IdempotencyConflict("Idempotency-Key was already used with a different request body")
            return self._to_job(row)

    def submit(
        self, request: JobRequest, *, source: str = "native", idempotency_key: str | None = None,
        fingerprint: str | None = None, timeout_s: float | None = None, owner: str = "", label: str | None = None,
        weight: float = 1.0,
    ) -> tuple[Job, bool]:
        with self._lock:
            if idempotency_key is not None:
                existing = self.idempotent(idempotency_key, fingerprint)
                if existing is not None:
                    return existing, False
            if not self.accepting:
                raise NotAccepting("the server is shutting down or not ready; retry shortly")
            if self.depth() >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)", self.retry_after_s())
            now = time.time()
            timeout = timeout_s or request.timeout_s or self.default_timeout_s
            job_id = uuid.uuid4().hex
            work = request.steps * request.n
            with self._write():
                self._db.execute(
                    "INSERT INTO jobs (id, status, priority, work, request, source, created_at, deadline, idem_key, "
                    "idem_hash, owner, label, weight) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (job_id, request.priority, work, request.model_dump_json(), source, now,
                     now + timeout if timeout else None, idempotency_key, fingerprint, owner, label, weight),
                )
            # Ahead of a new job: every queued job of its priority or higher.
            position = sum(count for prio, (count, _) in self._queued.items() if prio >= request.priority)
            self._count(request.priority, work, +1)
            eta = self._queued_eta(position, work)
            job = Job(id=job_id, status=JobStatus.queued, request=request, source=source, queue_position=position,
                      steps=request.steps, eta_s=eta, created_at=_ts(now), label=label)
            self._wakeup.notify_all()
        self._publish("queued", job)
        return job, True

    def cancel(self, job_id: str, running: bool = True) -> Job:
        with self._lock:
            row = self._row(job_id)
            status = JobStatus(row["status"])
            if status.terminal:
                raise JobFinished(f"job {job_id} already {status.value}")
            if status is JobStatus.running and not running:
                return self._to_job(row)
            if status is JobStatus.running:
                self._cancel.add(job_id)
                with self._write():
                    self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return self._to_job(self._row(job_id))
        return self.mark_canceled(job_id)

    # ----- runner side -----------------------------------------------------------------------
    def claim(
        self, select: Selector | None = None, wait_s: float = 0.5, linger_s: float = 0.0,
        full: Callable[[Sequence[Job]], bool] | None = None, worker: str | None = None,
    ) -> list[Job]:
        """Wait up to `wait_s` for work; then, while the selection is not `full`, up to `linger_s` more
        for companions to arrive (a batch that waits a few ms can double its size)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            chosen: list[Job] = []
            linger_until: float | None = None
            while True:
                rows = self._fair_window()
                if rows:
                    candidates = [self._to_job(r, with_position=False) for r in rows]
                    chosen = list(select(candidates)) if select else candidates[:1]
                    if linger_until is None:
                        linger_until = time.monotonic() + linger_s
                    if full is None or full(chosen) or time.monotonic() >= linger_until:
                        break
                    self._wakeup.wait(linger_until - time.monotonic())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._wakeup.wait(remaining)
            now = time.time()
            batch_id = uuid.uuid4().hex[:12]
            with self._write():  # the whole batch is claimed, or none of it
                for job in chosen:
                    self._db.execute(
                        "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, batch_id = ?, "
                        "batch_images = ?, worker = ? WHERE id = ?",
                        (now, batch_id, sum(j.request.n for j in chosen), worker, job.id),
                    )
            claimed = []
            owners = {row["id"]: row for row in rows}  # the window the selection was made from
            for job in chosen:
                row = owners[job.id]
                fairshare.charge(self._passes, self._vt, row["owner"], job.request.steps * job.request.n, row["weight"])
                self._count(job.request.priority, job.request.steps * job.request.n, -1)
                self._progress[job.id] = (0, job.request.steps)
                claimed.append(self._to_job(self._row(job.id)))
        for job in claimed:
            self._publish("started", job)
        return claimed

    def _fair_window(self) -> list[sqlite3.Row]:
        """The queued jobs the selector sees: the head of the caller whose fair-share turn it is, then the
        queue in order (to fill its batch from)."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT ?", (policy.CLAIM_WINDOW,)
        ).fetchall()
        if not rows:
            return rows
        heads = self._db.execute(
            "SELECT owner, MIN(seq) AS first FROM jobs WHERE status = 'queued' AND priority = ? GROUP BY owner "
            "ORDER BY first", (rows[0]["priority"],)).fetchall()
        if len(heads) < 2:
            return rows
        owner, self._vt = fairshare.pick([h["owner"] for h in heads], self._passes, self._vt)
        first = next(h["first"] for h in heads if h["owner"] == owner)
        head = self._db.execute("SELECT * FROM jobs WHERE seq = ?", (first,)).fetchone()
        if len(self._passes) > 10_000:  # callers come and go: keep those with jobs queued
            self._passes = {h["owner"]: self._passes[h["owner"]] for h in heads if h["owner"] in self._passes}
        return [head, *(r for r in rows if r["seq"] != first)]

    def shared_get(self, table: str) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM shared WHERE tbl = ?", (table,)).fetchall())

    def shared_put(self, table: str, key: str, value: str | None) -> None:
        with self._write():
            if value is None:
                self._db.execute("DELETE FROM shared WHERE tbl = ? AND key = ?", (table, key))
            else:
                self._db.execute("INSERT OR REPLACE INTO shared (tbl, key, value) VALUES (?, ?, ?)", (table, key, value))


    def take_tokens(self, bucket: str, rate: float, burst: float, n: float) -> tuple[bool, float, float]:
        # One process owns this queue: the buckets live in its memory (a restart refills them).
        with self._lock:
            tokens, at = self._buckets.get(bucket, (None, 0.0))
            now = time.monotonic()
            taken, left, retry = refill(tokens, now - at, Rate(rate, burst), n)
            self._buckets[bucket] = (left, now)
            if len(self._buckets) > 100_000:  # callers come and go: forget those idle for an hour
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 3600}
            return taken, left, retry
    def register_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        with self._lock:
            self._workers[info["name"]] = {**info, "last_heartbeat": time.time(), "ttl_s": ttl_s}

    def workers(self) -> list[dict[str, Any]]:
        now = time.time()
        with self._lock:
            live = [w for w in self._workers.values() if now - w["last_heartbeat"] <= w["ttl_s"]]
        return [{k: v for k, v in w.items() if k != "ttl_s"} for w in live]

    def heartbeat(self, job_ids: Sequence[str]) -> None:
        """No leases here: one process owns the queue and its runner; a restart recovers running jobs."""

    def deadlines(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        with self._lock:
            return {job_id: self._row(job_id)["deadline"] for job_id in job_ids}

    def canceled(self, job_ids: Sequence[str]) -> set[str]:
        return {job_id for job_id in job_ids if job_id in self._cancel}

    def progress(self, job_ids: Sequence[str], step: int, steps: int, batch_id: str | None = None) -> Stops:
        """No leases here (one process owns the queue and its runner): a job is lost only when it ended meanwhile
        (the reaper timed it out)."""
        stops = Stops(self.canceled(job_ids), set())
        for job_id in job_ids:
            if job_id in stops.canceled:
                continue
            with self._lock:
                row = self._db.execute("SELECT status, batch_images FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["status"] != "running":
                    stops.lost.add(job_id)
                    self._progress.pop(job_id, None)
                    continue
                self._progress[job_id] = (step, steps)
                eta = policy.running_eta(steps, step, row["batch_images"] or 1, self._seconds_per_step)
            self.events.publish(job_id, progress_event(job_id, step, steps, eta))
        return stops

    def record_speed(self, seconds_per_step: float) -> None:
        with self._lock:
            self._seconds_per_step = policy.blend_speed(self._seconds_per_step, seconds_per_step)

    def _finish(self, job_id: str, status: JobStatus, **fields: Any) -> Job:
        """Record the job's end, once: a job that already ended is returned unchanged, with no event."""
        with self._lock:
            before = self._row(job_id)
            if JobStatus(before["status"]).terminal:
                return self._to_job(before)
            sets = ", ".join(f"{k} = ?" for k in fields)
            with self._write():
                self._db.execute(
                    f"UPDATE jobs SET status = ?, finished_at = ?{', ' + sets if sets else ''} WHERE id = ?",
                    (status.value, time.time(), *fields.values(), job_id),
                )
            if before["status"] == "queued":
                self._count(before["priority"], before["work"], -1)
            job = self._to_job(self._row(job_id))
            self._progress.pop(job_id, None)
            self._cancel.discard(job_id)
        self._publish(status.value, job)
        return job

    def requeue(self, job_id: str) -> None:
        with self._lock:
            row = self._row(job_id)
            if row["status"] != "running":
                return
            with self._write():
                self._db.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL, attempts = MAX(0, attempts - 1) WHERE id = ?",
                    (job_id,),
                )
            self._count(row["priority"], row["work"], +1)
            self._progress.pop(job_id, None)
            self._wakeup.notify_all()

    def recover(self) -> int:
        """After a restart: jobs that were running go back to the queue, or fail after MAX_ATTEMPTS."""
        with self._lock:
            given_up = self._db.execute(
                "SELECT id, attempts FROM jobs WHERE status = 'running' AND attempts >= ?", (MAX_ATTEMPTS,)
            ).fetchall()
            with self._write():
                requeued = self._db.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running' AND attempts < ?",
                    (MAX_ATTEMPTS,),
                ).rowcount
            self._recount()
        for row in given_up:
            self.fail(row["id"], policy.given_up(row["attempts"]), kind="internal")
        return requeued

    def expire(self) -> list[Job]:
        """Fail jobs whose timeout passed: queued ones at once; running ones when the runner, which stops
        them at their next step, has not done so within `policy.RUNNING_GRACE_S` (it is stuck or gone)."""
        now = time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, status, created_at, deadline FROM jobs WHERE deadline IS NOT NULL AND "
                "((status = 'queued' AND deadline < ?) OR (status = 'running' AND deadline < ?))",
                (now, now - policy.RUNNING_GRACE_S),
            ).fetchall()
        return [self.fail(r["id"], policy.timed_out(r["deadline"] - r["created_at"], r["status"]), "timeout")
                for r in rows]

    def prune(self, finished_before: float, limit: int = 1000) -> int:
        with self._write():
            return self._db.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at < ? "
                f"AND status IN ({_FINAL}) LIMIT ?)", (finished_before, limit)).rowcount

    def _publish(self, kind: str, job: Job) -> None:
        self.events.publish(job.id, job_event(kind, job))

