"""The embedded queue's rules, on a real SQLite file (no server)."""

import time

import pytest

from sdserve.core import fingerprint
from sdserve.jobs.local import SQLiteJobQueue
from sdserve.jobs.queue import (
    MAX_ATTEMPTS,
    IdempotencyConflict,
    JobFinished,
    NotAccepting,
    QueueFull,
)
from sdserve.schema import ImageRef, JobRequest, JobStatus


@pytest.fixture()
def queue(tmp_path):
    q = SQLiteJobQueue(tmp_path / "jobs.db", max_queue=4)
    yield q
    q.close()


def submit(q, prompt, **kw):
    return q.submit(JobRequest(prompt=prompt, **kw))[0]


def test_priority_then_fifo(queue):
    a, b, c = submit(queue, "a"), submit(queue, "b", priority=1), submit(queue, "c")
    assert [queue.claim(wait_s=0)[0].id for _ in range(3)] == [b.id, a.id, c.id]
    assert queue.claim(wait_s=0) == []


def test_seed_is_fixed_when_accepted():
    from sdserve.core import job_request
    from sdserve.schema import GenerationRequest

    queued = job_request(GenerationRequest(prompt="x", seed=-1), model="m", keys={}, init_size=None)
    assert queued.seed >= 0 and queued.model == "m"


def test_bounded(queue):
    for i in range(4):
        submit(queue, str(i))
    with pytest.raises(QueueFull) as err:
        submit(queue, "over")
    assert err.value.retry_after_s >= 1


def test_not_accepting(queue):
    queue.accepting = False
    with pytest.raises(NotAccepting):
        submit(queue, "x")


def test_idempotency(queue):
    req = JobRequest(prompt="x")
    first, created = queue.submit(req, idempotency_key="k", fingerprint=fingerprint(req))
    again, created_again = queue.submit(req, idempotency_key="k", fingerprint=fingerprint(req))
    assert created and not created_again and first.id == again.id
    other = JobRequest(prompt="y")
    with pytest.raises(IdempotencyConflict):
        queue.submit(other, idempotency_key="k", fingerprint=fingerprint(other))


def test_recover_requeues_running_then_gives_up(tmp_path):
    path = tmp_path / "jobs.db"
    job_id = submit(SQLiteJobQueue(path), "x").id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        q = SQLiteJobQueue(path)  # a new process after a crash
        assert q.recover() == (1 if attempt > 1 else 0)
        claimed = q.claim(wait_s=0)
        assert claimed[0].id == job_id and claimed[0].attempts == attempt
    q = SQLiteJobQueue(path)
    assert q.recover() == 0
    job = q.get(job_id)
    assert job.status is JobStatus.failed and f"{MAX_ATTEMPTS} times" in job.error


def test_requeue_on_shutdown_does_not_count_an_attempt(queue):
    job = submit(queue, "x")
    queue.claim(wait_s=0)
    queue.requeue(job.id)
    assert queue.get(job.id).status is JobStatus.queued
    assert queue.get(job.id).attempts == 0


def test_cancel(queue):
    queued, running = submit(queue, "q"), submit(queue, "r", priority=5)
    queue.claim(wait_s=0)
    assert queue.cancel(queued.id).status is JobStatus.canceled
    assert queue.cancel(running.id).status is JobStatus.running  # flagged; the runner stops it
    assert queue.cancel_requested(running.id)
    queue.mark_canceled(running.id)
    with pytest.raises(JobFinished):
        queue.cancel(running.id)


def test_expire_waiting_jobs(queue):
    job = queue.submit(JobRequest(prompt="x"), timeout_s=0.05)[0]
    time.sleep(0.1)
    expired = queue.expire()
    assert [j.id for j in expired] == [job.id]
    assert queue.get(job.id).error_kind == "timeout"


def test_succeed_records_images_and_progress(queue):
    job = submit(queue, "x", steps=4)
    queue.claim(wait_s=0)
    queue.progress(job.id, 2, 4)
    assert (queue.get(job.id).step, queue.get(job.id).progress) == (2, 0.5)
    done = queue.succeed(job.id, [ImageRef(id="a" * 32, url="/api/v1/images/" + "a" * 32, seed=1)])
    assert done.status is JobStatus.succeeded and done.progress == 1.0 and done.images[0].seed == 1


def test_eta_uses_measured_speed(queue):
    submit(queue, "a", steps=10)
    second = submit(queue, "b", steps=10)
    assert queue.get(second.id).eta_s is None  # nothing measured yet
    queue.record_speed(0.1)
    assert queue.get(second.id).eta_s == pytest.approx(2.0)  # 10 steps ahead + its own 10
    assert queue.get(second.id).queue_position == 1


def test_in_memory_counts_match_the_table(queue, tmp_path):
    """Depth and positions are kept in memory; every transition must keep them equal to the table."""
    jobs = [submit(queue, str(i), priority=i % 2, steps=5) for i in range(4)]
    assert [j.queue_position for j in jobs] == [0, 0, 2, 1]  # returned at submit: priority 1 jumps ahead
    queue.claim(wait_s=0)                      # queued -> running
    queue.cancel(jobs[2].id)                   # queued -> canceled
    running = queue.running()[0]
    queue.requeue(running.id)                  # running -> queued
    assert queue.depth() == 3
    table = queue._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
    assert table == 3
    for job in queue.list(status="queued"):
        fresh = queue.get(job.id).queue_position
        assert fresh is not None
    reopened = SQLiteJobQueue(tmp_path / "jobs.db", max_queue=4)
    assert reopened.depth() == 3
