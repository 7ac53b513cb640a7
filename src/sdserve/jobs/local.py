"""Embedded job queue and store: SQLite in WAL mode, in the data dir, shared by the processes of one host.

`sdserve serve` runs its HTTP API and its engine processes over this file (so does `sdserve api` beside
`sdserve worker` on one machine). Everything a process needs from another lives in the database: job records,
the queue with leases, progress, cancel flags, events (replayable after an event id), the fair-share passes,
rate-limit buckets and the worker registry. Every state change and its event commit in one transaction, and
each commit that someone may wait for rings the other processes (jobs/wake.py).

A claimed job is leased to its worker (`--lease-s`), renewed by its heartbeat. It goes back to the queue when
the lease runs out, or at once when the process that claimed it is gone (same host: its pid no longer runs).
Every accepted job is committed before `submit` returns, so a crash or restart loses none.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdserve import webhooks
from sdserve.jobs import fairshare, policy
from sdserve.jobs.events import Event, Preview, job_event, preview_event, progress_event
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
from sdserve.jobs.wake import Wakeup
from sdserve.ratelimit import Rate, refill
from sdserve.schema import FINAL_STATUSES, ImageRef, Job, JobRequest, JobStatus

log = logging.getLogger(__name__)

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
    weight REAL NOT NULL DEFAULT 1,
    step INTEGER NOT NULL DEFAULT 0,  -- progress of a running job
    steps INTEGER,
    lease_until REAL,  -- a running job's lease: its worker heartbeats it
    claimer TEXT,  -- the process that claimed it: host:pid-namespace:pid
    preview TEXT,  -- a running job's latest preview event (JSON); cleared when it ends
    webhook TEXT  -- its webhook (webhooks.spec: url and events), or NULL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority DESC, seq);
CREATE TABLE IF NOT EXISTS shared (tbl TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (tbl, key));
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, data TEXT NOT NULL,
                                   at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, tokens REAL NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS workers (name TEXT PRIMARY KEY, info TEXT NOT NULL, expires REAL NOT NULL);
-- The webhook outbox (webhooks.py): one row per message to send, written with the event it reports.
CREATE TABLE IF NOT EXISTS webhooks (key TEXT PRIMARY KEY, job_id TEXT NOT NULL, event TEXT NOT NULL, step INTEGER,
                                     due REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, first_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (due);
CREATE TABLE IF NOT EXISTS webhook_log (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS webhook_log_job ON webhook_log (job_id, id);
"""

_FINAL = ", ".join(f"'{status.value}'" for status in sorted(FINAL_STATUSES))  # SQL: the final statuses
# The queue's own rows of the shared table: the measured speed, fair share's virtual time and passes.
_QUEUE, _PASSES = "_queue", "_fairshare"
# Events are kept this long (a client resuming an SSE stream after Last-Event-ID), and pruned this often.
EVENTS_KEEP_S = 3600.0
EVENTS_PRUNE_S = 60.0
# A process looks at the table at least this often, whether or not it was rung (jobs/wake.py).
POLL_S = 0.25
HOST = socket.gethostname()


def _pid_namespace() -> str:
    """Processes in other containers on one host can share a hostname: their pids are compared only within one
    pid namespace."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "-"


PID_NAMESPACE = _pid_namespace()


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def _storage_error(exc: sqlite3.Error) -> StorageError:
    text = str(exc)
    full = "full" in text or getattr(exc, "sqlite_errorcode", None) == 13 or (
        isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOSPC)
    return StorageError(f"the job store cannot write: {text}", full=full)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a committed job survives a process crash or kill; only a power cut could lose the last
    # moments. FULL would fsync every submission.
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def claimer_gone(claimer: str | None) -> bool:
    """The process that claimed a job (`host:pid-namespace:pid`) no longer runs. Known on this host and in this
    pid namespace only: elsewhere, and for a process that still runs but hangs, the lease decides."""
    where, _, pid_text = (claimer or "").rpartition(":")
    if where != f"{HOST}:{PID_NAMESPACE}" or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) runs nothing
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


@dataclass(eq=False)
class _Subscription:
    job_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    types: frozenset[str] | None
    last: int  # the last event id delivered (or skipped)
    caught_up: bool  # events up to the dispatcher's cursor were read for it


class SQLiteEventBus:
    """Job events in the `events` table: any process publishes (in the transaction of the change it reports), any
    process subscribes, and a subscriber can resume after an event id (SSE's Last-Event-ID). One dispatcher thread
    per process reads new events when rung (or every POLL_S) and hands them to its subscribers and listeners.
    Listeners (metrics) see every event of this job store, whichever process published it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._subs: dict[str, set[_Subscription]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._lock = threading.Lock()
        self._rung = threading.Event()
        self._thread: threading.Thread | None = None
        self._cursor = 0
        self._db: sqlite3.Connection | None = None
        self._closed = False

    def ring(self) -> None:
        self._rung.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._db = _connect(self._path)
            self._cursor = self._max_id(self._db)
            self._thread = threading.Thread(target=self._dispatch, name="sdserve-events", daemon=True)
            self._thread.start()

    @staticmethod
    def _max_id(db: sqlite3.Connection) -> int:
        return db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)
        self._start()

    def _dispatch(self) -> None:
        db = self._db
        assert db is not None
        while not self._closed:
            self._rung.wait(POLL_S)
            self._rung.clear()
            try:
                self._deliver(db)
            except sqlite3.Error as exc:
                log.warning("reading job events: %s", exc)
            except Exception:
                log.exception("job event dispatch failed")

    def _deliver(self, db: sqlite3.Connection) -> None:
        # The cursor moves, and subscribers join, under the lock: a subscriber gets every event after its start.
        with self._lock:
            for sub in [s for subs in self._subs.values() for s in subs if not s.caught_up]:
                # resuming after an older event id: its job's events up to the cursor first, in order
                for row in db.execute("SELECT id, data FROM events WHERE job_id = ? AND id > ? AND id <= ? "
                                      "ORDER BY id", (sub.job_id, sub.last, self._cursor)).fetchall():
                    self._put(sub, row["id"], json.loads(row["data"]))
                sub.caught_up = True
        while True:
            rows = db.execute("SELECT id, job_id, data FROM events WHERE id > ? ORDER BY id LIMIT 500",
                              (self._cursor,)).fetchall()
            events = [(row["id"], row["job_id"], json.loads(row["data"])) for row in rows]
            for _, _, event in events:  # listeners first: a client told of its job's end finds it in /metrics
                for listener in self._listeners:
                    try:
                        listener(event)
                    except Exception:  # a broken listener must not break the job
                        log.exception("event listener failed")
            with self._lock:
                for event_id, job_id, event in events:
                    for sub in self._subs.get(job_id, ()):
                        if sub.caught_up and event_id > sub.last:
                            self._put(sub, event_id, event)
                    self._cursor = event_id
            if len(rows) < 500:
                return

    @staticmethod
    def _put(sub: _Subscription, event_id: int, event: Event) -> None:
        sub.last = event_id
        if sub.types is not None and event["type"] not in sub.types:
            return
        try:
            sub.loop.call_soon_threadsafe(sub.queue.put_nowait, {**event, "event_id": str(event_id)})
        except RuntimeError:  # the subscriber's loop is closed: it went away
            pass

    @contextmanager
    def subscribe(self, job_id: str, types: frozenset[str] | None = None,
                  after: str | None = None) -> Iterator[asyncio.Queue[Event]]:
        """Subscribe before reading the job's current state, so no event slips between the two. `types` limits the
        events delivered (e.g. only the end); `after`: resume after this event id, else deliver from now."""
        self._start()
        try:
            resume = int(after) if after is not None else None
        except ValueError:
            resume = None  # not an id of this store: from now
        with self._lock:
            last = self._cursor if resume is None else resume
            entry = _Subscription(job_id, asyncio.get_running_loop(), asyncio.Queue(), types, last,
                                  caught_up=last >= self._cursor)
            self._subs.setdefault(job_id, set()).add(entry)
        if not entry.caught_up:
            self._rung.set()
        try:
            yield entry.queue
        finally:
            with self._lock:
                subs = self._subs.get(job_id)
                if subs is not None:
                    subs.discard(entry)
                    if not subs:
                        del self._subs[job_id]

    def close(self) -> None:
        self._closed = True
        self._rung.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self._db is not None:
            self._db.close()


class SQLiteJobQueue(JobEnds):
    def __init__(
        self, path: Path, *, max_queue: int = 256, default_timeout_s: float | None = None, lease_s: float = 30.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_queue = max_queue
        self.default_timeout_s = default_timeout_s
        self.lease_s = lease_s
        self.accepting = True
        self.claimer = f"{HOST}:{PID_NAMESPACE}:{os.getpid()}"
        try:
            self._db = _connect(path)
            self._db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self.events = SQLiteEventBus(path)
        self._wake = Wakeup(path, self._rung)
        self._events_pruned = -1e9

    def _migrate(self) -> None:
        """Columns added after the first release of the table: add them to an older jobs.db in place (in one
        transaction: two processes opening it at once must not both add a column)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._add_columns()
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _add_columns(self) -> None:
        have = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for column, kind in (("batch_id", "TEXT"), ("batch_images", "INTEGER"), ("worker", "TEXT"),
                             ("owner", "TEXT NOT NULL DEFAULT ''"), ("label", "TEXT"),
                             ("weight", "REAL NOT NULL DEFAULT 1"), ("step", "INTEGER NOT NULL DEFAULT 0"),
                             ("steps", "INTEGER"), ("lease_until", "REAL"), ("claimer", "TEXT"),
                             ("preview", "TEXT"), ("webhook", "TEXT")):
            if column not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        # Fair share reads each caller's oldest queued job; retention the oldest ended ones.
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (status, priority, owner, seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_owned ON jobs (owner, seq)")  # a caller's own, listed
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL")

    def _rung(self) -> None:
        """Another process committed something: claims and event streams look again now."""
        with self._lock:
            self._wakeup.notify_all()
        self.events.ring()

    def _changed(self) -> None:
        """This process committed something others may wait for."""
        self._rung()
        self._wake.ring()

    def close(self) -> None:
        self.events.close()
        self._wake.close()
        with self._lock:
            self._db.close()

    def ping(self) -> None:
        """The file is on this host: reachable while the process runs (writes are checked by WriteHealth)."""

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction: all of it is committed, or none of it (a full disk rolls it back)."""
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

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise _storage_error(exc) from None

    def _event(self, job_id: str, event: Event) -> None:
        """Inside a transaction: the event commits with the change it reports, and so does the webhook delivery
        it makes due (the outbox)."""
        now = time.time()
        self._db.execute("INSERT INTO events (job_id, data, at) VALUES (?, ?, ?)", (job_id, json.dumps(event), now))
        if event["type"] == "preview":
            return
        row = self._db.execute("SELECT webhook FROM jobs WHERE id = ?", (job_id,)).fetchone()
        name = webhooks.wanted(row["webhook"] if row else None, event["type"])
        if name == "progress":  # one pending per job, with the latest step, at most every PROGRESS_EVERY_S
            self._db.execute(
                "INSERT INTO webhooks (key, job_id, event, step, due, first_at) VALUES (?, ?, 'progress', ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET step = excluded.step WHERE attempts = 0",
                (f"{job_id}:progress", job_id, event["step"], now + webhooks.PROGRESS_EVERY_S, now))
        elif name is not None:
            self._db.execute("INSERT OR IGNORE INTO webhooks (key, job_id, event, due, first_at) VALUES (?, ?, ?, ?, ?)",
                             (f"{job_id}:{name}", job_id, name, now, now))

    # ----- webhooks (webhooks.Outbox) ---------------------------------------------------------------
    def claim_webhooks(self, limit: int, lease_s: float) -> list[webhooks.Delivery]:
        now = time.time()
        if not self._read("SELECT 1 FROM webhooks WHERE due <= ? LIMIT 1", (now,)):
            return []  # the usual case: no write transaction
        with self._write():
            rows = self._db.execute("SELECT * FROM webhooks WHERE due <= ? ORDER BY due LIMIT ?",
                                    (now, limit)).fetchall()
            self._db.executemany("UPDATE webhooks SET due = ?, attempts = attempts + 1 WHERE key = ?",
                                 [(now + lease_s, row["key"]) for row in rows])
        return [webhooks.Delivery(row["key"], row["job_id"], row["event"], row["attempts"] + 1, row["first_at"],
                                  row["step"]) for row in rows]

    def webhook_attempted(self, delivery: webhooks.Delivery, record: dict[str, Any], retry_at: float | None) -> None:
        with self._write():
            self._db.execute("INSERT INTO webhook_log (job_id, data) VALUES (?, ?)",
                             (delivery.job_id, json.dumps(record)))
            if retry_at is None:
                self._db.execute("DELETE FROM webhooks WHERE key = ?", (delivery.key,))
            else:
                self._db.execute("UPDATE webhooks SET due = ? WHERE key = ?", (retry_at, delivery.key))
            self._db.execute("DELETE FROM webhook_log WHERE job_id = ? AND id NOT IN (SELECT id FROM webhook_log "
                             "WHERE job_id = ? ORDER BY id DESC LIMIT ?)",
                             (delivery.job_id, delivery.job_id, webhooks.LOG_KEEP))

    def webhook_release(self, delivery: webhooks.Delivery, due: float) -> None:
        with self._write():
            self._db.execute("UPDATE webhooks SET due = ?, attempts = MAX(0, attempts - 1) WHERE key = ?",
                             (due, delivery.key))

    def webhook_log(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(row["data"]) for row in
                self._read("SELECT data FROM webhook_log WHERE job_id = ? ORDER BY id", (job_id,))]

    # ----- reading ---------------------------------------------------------------------------
    def _row(self, job_id: str) -> sqlite3.Row:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return row

    def _speed(self) -> float | None:
        row = self._db.execute("SELECT value FROM shared WHERE tbl = ? AND key = 'speed'", (_QUEUE,)).fetchone()
        return float(row[0]) if row else None

    def _queued(self) -> dict[int, tuple[int, int]]:
        """Queued jobs per priority: (count, work)."""
        return {prio: (count, work) for prio, count, work in self._db.execute(
            "SELECT priority, COUNT(*), SUM(work) FROM jobs WHERE status = 'queued' GROUP BY priority")}

    def _to_job(self, row: sqlite3.Row, with_position: bool = True, figures: dict[str, Any] | None = None) -> Job:
        """`figures`: the queue-wide numbers ETAs need, read once for all the rows of one listing."""
        figures = {} if figures is None else figures
        status = JobStatus(row["status"])
        request = JobRequest.model_validate_json(row["request"])
        steps = row["steps"] or request.steps
        step = steps if status is JobStatus.succeeded else (row["step"] if status is JobStatus.running else 0)
        position = eta = None
        if status is JobStatus.queued and with_position:
            position = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > ? OR (priority = ? AND seq < ?))",
                (row["priority"], row["priority"], row["seq"]),
            ).fetchone()[0]
            eta = self._queued_eta(position, row["work"], figures)
        elif status is JobStatus.running:
            eta = policy.running_eta(steps, step, row["batch_images"] or request.n, self._figure(figures, "speed"))
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

    def _figure(self, figures: dict[str, Any], name: str) -> Any:
        if name not in figures:
            figures[name] = {"speed": self._speed, "queued": self._queued, "running_left": self._running_left}[name]()
        return figures[name]

    def _queued_eta(self, position: int, work: float, figures: dict[str, Any]) -> float | None:
        queued = self._figure(figures, "queued").values()
        depth = sum(count for count, _ in queued)
        queued_work = sum(w for _, w in queued)
        return policy.queued_eta(position, depth, queued_work, self._figure(figures, "running_left"), work,
                                 self._figure(figures, "speed"))

    def _running_left(self) -> float:
        """The image-steps the running jobs have left (all of a job's work until its first step)."""
        return sum(policy.work_left(r["work"], r["steps"] or 1, r["step"]) for r in self._db.execute(
            "SELECT work, step, steps FROM jobs WHERE status = 'running'").fetchall())

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
            figures: dict[str, Any] = {}
            return [self._to_job(r, figures=figures) for r in rows]

    def depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    # ----- client side -----------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """A guess at when a slot frees up: the queue's work at the measured speed, within 1..300 s."""
        with self._lock:
            queued_work = sum(w for _, w in self._queued().values())
            speed = self._speed()
        return policy.retry_after_s(queued_work, speed, self.max_queue)

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
        now = time.time()
        timeout = timeout_s or request.timeout_s or self.default_timeout_s
        job_id = uuid.uuid4().hex
        work = request.steps * request.n
        with self._write():  # the checks and the insert in one transaction: two processes never both take the last slot
            if idempotency_key is not None:
                existing = self.idempotent(idempotency_key, fingerprint)
                if existing is not None:
                    return existing, False
            if not self.accepting:
                raise NotAccepting("the server is shutting down or not ready; retry shortly")
            if self.depth() >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)", self.retry_after_s())
            self._db.execute(
                "INSERT INTO jobs (id, status, priority, work, request, source, created_at, deadline, idem_key, "
                "idem_hash, owner, label, weight, steps, webhook) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?)",
                (job_id, request.priority, work, request.model_dump_json(), source, now,
                 policy.deadline(now, timeout, request.cancel_after_s), idempotency_key, fingerprint, owner, label,
                 weight, request.steps, request.webhook),
            )
            job = self._to_job(self._row(job_id))
            self._event(job_id, job_event("queued", job))
        self._changed()
        return job, True

    def cancel(self, job_id: str, running: bool = True) -> Job:
        with self._write():
            row = self._row(job_id)
            status = JobStatus(row["status"])
            if status.terminal:
                raise JobFinished(f"job {job_id} already {status.value}")
            if status is JobStatus.running:
                if running:  # flagged: its runner stops it at its next step
                    self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                return self._to_job(self._row(job_id))
            job = self._end(row, JobStatus.canceled, error="canceled", error_kind="canceled")
        self._changed()
        return job

    # ----- runner side -----------------------------------------------------------------------
    def claim(
        self, select: Selector | None = None, wait_s: float = 0.5, linger_s: float = 0.0,
        full: Callable[[Sequence[Job]], bool] | None = None, worker: str | None = None,
    ) -> list[Job]:
        """Wait up to `wait_s` for work; then, while the selection is not `full`, up to `linger_s` more for
        companions to arrive (a batch that waits a few ms can double its size). The selection is made again inside
        the claiming transaction, so two processes never claim the same job."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            linger_until: float | None = None
            while True:
                rows, _ = self._fair_window()
                if rows:
                    candidates = [self._to_job(r, with_position=False) for r in rows]
                    chosen = list(select(candidates)) if select else candidates[:1]
                    if linger_until is None:
                        linger_until = time.monotonic() + linger_s
                    if full is None or full(chosen) or time.monotonic() >= linger_until:
                        claimed = self._claim(select, worker)
                        if claimed:
                            break
                        linger_until = None
                        continue
                    self._wakeup.wait(min(POLL_S, linger_until - time.monotonic()))
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._wakeup.wait(min(POLL_S, remaining))
        self._changed()
        return claimed

    def _claim(self, select: Selector | None, worker: str | None) -> list[Job]:
        now = time.time()
        batch_id = uuid.uuid4().hex[:12]
        with self._write():
            rows, vt = self._fair_window()
            if not rows:
                return []
            candidates = [self._to_job(r, with_position=False) for r in rows]
            chosen = list(select(candidates)) if select else candidates[:1]
            images = sum(j.request.n for j in chosen)
            passes = self._passes()
            by_id = {row["id"]: row for row in rows}
            claimed = []
            for job in chosen:
                self._db.execute(
                    "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, batch_id = ?, "
                    "batch_images = ?, worker = ?, step = 0, steps = ?, lease_until = ?, claimer = ? "
                    "WHERE id = ?",
                    (now, batch_id, images, worker, job.request.steps, now + self.lease_s, self.claimer, job.id),
                )
                row = by_id[job.id]
                fairshare.charge(passes, vt, row["owner"], job.request.steps * job.request.n, row["weight"])
                claimed.append(self._to_job(self._row(job.id)))
                self._event(job.id, job_event("started", claimed[-1]))
            self._db.executemany("INSERT OR REPLACE INTO shared (tbl, key, value) VALUES (?, ?, ?)",
                                 [(_PASSES, owner, repr(value)) for owner, value in passes.items()]
                                 + [(_QUEUE, "vt", repr(vt))])
        return claimed

    def _passes(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._db.execute("SELECT key, value FROM shared WHERE tbl = ?", (_PASSES,))}

    def _fair_window(self) -> tuple[list[sqlite3.Row], float]:
        """The queued jobs the selector sees: the head of the caller whose fair-share turn it is, then the queue in
        order (to fill its batch from); and the virtual time after this turn."""
        row = self._db.execute("SELECT value FROM shared WHERE tbl = ? AND key = 'vt'", (_QUEUE,)).fetchone()
        vt = float(row[0]) if row else 0.0
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT ?", (policy.CLAIM_WINDOW,)
        ).fetchall()
        if not rows:
            return rows, vt
        heads = self._db.execute(
            "SELECT owner, MIN(seq) AS first FROM jobs WHERE status = 'queued' AND priority = ? GROUP BY owner "
            "ORDER BY first", (rows[0]["priority"],)).fetchall()
        if len(heads) < 2:
            return rows, vt
        owner, vt = fairshare.pick([h["owner"] for h in heads], self._passes(), vt)
        first = next(h["first"] for h in heads if h["owner"] == owner)
        head = self._db.execute("SELECT * FROM jobs WHERE seq = ?", (first,)).fetchone()
        return [head, *(r for r in rows if r["seq"] != first)], vt

    def shared_get(self, table: str) -> dict[str, str]:
        return {row["key"]: row["value"] for row in self._read("SELECT key, value FROM shared WHERE tbl = ?", (table,))}

    def shared_put(self, table: str, key: str, value: str | None) -> None:
        with self._write():
            if value is None:
                self._db.execute("DELETE FROM shared WHERE tbl = ? AND key = ?", (table, key))
            else:
                self._db.execute("INSERT OR REPLACE INTO shared (tbl, key, value) VALUES (?, ?, ?)", (table, key, value))

    def take_tokens(self, bucket: str, rate: float, burst: float, n: float) -> tuple[bool, float, float]:
        now = time.time()
        with self._write():
            row = self._db.execute("SELECT tokens, at FROM buckets WHERE name = ?", (bucket,)).fetchone()
            tokens, at = (row["tokens"], row["at"]) if row else (None, now)
            taken, left, retry = refill(tokens, now - at, Rate(rate, burst), n)
            self._db.execute("INSERT OR REPLACE INTO buckets (name, tokens, at) VALUES (?, ?, ?)", (bucket, left, now))
        return taken, left, retry

    def register_worker(self, info: dict[str, Any], ttl_s: float) -> None:
        now = time.time()
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO workers (name, info, expires) VALUES (?, ?, ?)",
                             (info["name"], json.dumps({**info, "last_heartbeat": now}), now + ttl_s))

    def drop_worker(self, name: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM workers WHERE name = ?", (name,))

    def workers(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT info FROM workers WHERE expires >= ? ORDER BY name", (time.time(),))
        return [json.loads(row["info"]) for row in rows]

    def heartbeat(self, job_ids: Sequence[str]) -> None:
        with self._write():
            self._db.executemany("UPDATE jobs SET lease_until = ? WHERE id = ? AND status = 'running'",
                                 [(time.time() + self.lease_s, job_id) for job_id in job_ids])

    def deadlines(self, job_ids: Sequence[str]) -> dict[str, float | None]:
        with self._lock:
            return {job_id: self._row(job_id)["deadline"] for job_id in job_ids}

    def canceled(self, job_ids: Sequence[str]) -> set[str]:
        marks = ",".join("?" * len(job_ids))
        return {row["id"] for row in self._read(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND status = 'running' AND cancel_requested = 1", job_ids)}

    def progress(self, job_ids: Sequence[str], step: int, steps: int, batch_id: str | None = None,
                 previews: Mapping[str, Preview] | None = None) -> Stops:
        """One transaction for the batch: each job's step and its event (and preview), and which jobs to stop."""
        previews = previews or {}
        stops = Stops(set(), set())
        with self._write():
            speed = self._speed()
            for job_id in job_ids:
                row = self._db.execute("SELECT status, batch_id, batch_images, cancel_requested FROM jobs "
                                       "WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["status"] != "running" or (batch_id is not None and row["batch_id"] != batch_id):
                    stops.lost.add(job_id)
                    continue
                if row["cancel_requested"]:
                    stops.canceled.add(job_id)
                    continue
                self._db.execute("UPDATE jobs SET step = ?, steps = ? WHERE id = ?", (step, steps, job_id))
                eta = policy.running_eta(steps, step, row["batch_images"] or 1, speed)
                self._event(job_id, progress_event(job_id, step, steps, eta))
                if job_id in previews:
                    event = preview_event(job_id, step, steps, previews[job_id])
                    self._db.execute("UPDATE jobs SET preview = ? WHERE id = ?", (json.dumps(event), job_id))
                    self._event(job_id, event)
        self._changed()
        return stops

    def latest_preview(self, job_id: str) -> Event | None:
        rows = self._read("SELECT preview FROM jobs WHERE id = ? AND status = 'running'", (job_id,))
        return json.loads(rows[0]["preview"]) if rows and rows[0]["preview"] else None

    def record_speed(self, seconds_per_step: float) -> None:
        with self._write():
            self._db.execute("INSERT OR REPLACE INTO shared (tbl, key, value) VALUES (?, 'speed', ?)",
                             (_QUEUE, repr(policy.blend_speed(self._speed(), seconds_per_step))))

    def _end(self, row: sqlite3.Row, status: JobStatus, **fields: Any) -> Job:
        """Inside a transaction: record the end of a job that has not ended, with its event."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(
            f"UPDATE jobs SET status = ?, finished_at = ?, lease_until = NULL, preview = NULL"
            f"{', ' + sets if sets else ''} WHERE id = ?",
            (status.value, time.time(), *fields.values(), row["id"]),
        )
        job = self._to_job(self._row(row["id"]))
        # previews are never kept: once the job ended, its event log keeps none of them either
        self._db.execute("DELETE FROM events WHERE job_id = ? AND json_extract(data, '$.type') = 'preview'",
                         (row["id"],))
        self._event(job.id, job_event(status.value, job))  # type: ignore[arg-type]
        return job

    def _finish(self, job_id: str, status: JobStatus, **fields: Any) -> Job:
        """Record the job's end, once: a job that already ended is returned unchanged, with no event."""
        with self._write():
            before = self._row(job_id)
            if JobStatus(before["status"]).terminal:
                return self._to_job(before)
            job = self._end(before, status, **fields)
        self._changed()
        return job

    def requeue(self, job_id: str) -> None:
        """Graceful stop: back to the queue, the attempt not counted."""
        with self._write():
            self._db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL, attempts = MAX(0, attempts - 1), step = 0, "
                "lease_until = NULL, claimer = NULL, preview = NULL WHERE id = ? AND status = 'running'", (job_id,))
        self._changed()

    def recover(self) -> int:
        """Jobs whose worker is gone go back to the queue, or fail after MAX_ATTEMPTS deliveries: those whose
        lease ran out, and at once those whose claiming process no longer runs on this host (a crash, kill -9,
        a restart). Jobs a live worker holds are left alone."""
        now = time.time()
        running = self._read("SELECT DISTINCT claimer FROM jobs WHERE status = 'running'")
        gone = [r["claimer"] for r in running if claimer_gone(r["claimer"])]  # checked outside the write lock
        due = ("FROM jobs WHERE status = 'running' AND (lease_until IS NULL OR lease_until < ? "
               f"OR claimer IN ({','.join('?' * len(gone))}))")
        if not self._read(f"SELECT 1 {due} LIMIT 1", (now, *gone)):
            return 0  # the usual case, every reaper tick: no write transaction
        requeued = ended = 0
        with self._write():  # what to take back is decided again inside the transaction that takes it
            for row in self._db.execute(f"SELECT * {due}", (now, *gone)).fetchall():
                if row["attempts"] >= MAX_ATTEMPTS:
                    self._end(row, JobStatus.failed, error=policy.given_up(row["attempts"]), error_kind="internal")
                    ended += 1
                    continue
                requeued += self._db.execute(
                    "UPDATE jobs SET status = 'queued', started_at = NULL, step = 0, lease_until = NULL, "
                    "claimer = NULL, preview = NULL WHERE id = ?", (row["id"],)).rowcount
        if requeued or ended:
            self._changed()
        return requeued

    def expire(self) -> list[Job]:
        """Reclaim the jobs of workers that are gone; fail jobs whose timeout passed: queued ones at once, running
        ones when the runner, which stops them at its next step, has not done so within `policy.RUNNING_GRACE_S`
        (it is stuck or gone). Old events are pruned here too."""
        self.recover()
        now = time.time()
        rows = self._read(
            "SELECT id, status, created_at, deadline, request FROM jobs WHERE deadline IS NOT NULL AND "
            "((status = 'queued' AND deadline < ?) OR (status = 'running' AND deadline < ?))",
            (now, now - policy.RUNNING_GRACE_S))
        if time.monotonic() - self._events_pruned > EVENTS_PRUNE_S:
            self._events_pruned = time.monotonic()
            with self._write():
                self._db.execute("DELETE FROM events WHERE at < ?", (now - EVENTS_KEEP_S,))
                self._db.execute("DELETE FROM workers WHERE expires < ?", (now,))
        return [self.end_past_deadline(r["id"], json.loads(r["request"]).get("cancel_after_s"), r["created_at"],
                                       r["deadline"], r["status"]) for r in rows]

    def prune(self, finished_before: float, limit: int = 1000) -> int:
        with self._write():
            ids = [r["id"] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE finished_at < ? AND status IN ({_FINAL}) LIMIT ?",
                (finished_before, limit)).fetchall()]
            marks = ",".join("?" * len(ids))
            self._db.execute(f"DELETE FROM events WHERE job_id IN ({marks})", ids)
            self._db.execute(f"DELETE FROM webhooks WHERE job_id IN ({marks})", ids)
            self._db.execute(f"DELETE FROM webhook_log WHERE job_id IN ({marks})", ids)
            return self._db.execute(f"DELETE FROM jobs WHERE id IN ({marks})", ids).rowcount
