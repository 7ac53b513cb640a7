"""The job queue contract, run against every backend: SQLite (a real file) and Redis (a real redis-server);
then what only one of them does (SQLite's restart recovery, Redis's leases and cross-process events)."""

import asyncio
import functools
import threading
import time

import pytest

from sdserve.core import fingerprint
from sdserve.jobs import policy
from sdserve.jobs.local import SQLiteJobQueue
from sdserve.jobs.queue import (
    MAX_ATTEMPTS,
    IdempotencyConflict,
    JobFinished,
    NotAccepting,
    QueueFull,
    Stops,
    StorageError,
)
from sdserve.schema import ImageRef, JobRequest, JobStatus


@pytest.fixture()
def queue(make_queue):
    return make_queue(max_queue=4)


def redis_queue(server, **kw):
    from sdserve.jobs.redis import RedisJobQueue

    server.client().flushdb()
    return RedisJobQueue(server.url, **kw)


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


CLAIM_AND_HANG = """
import sys, time
from pathlib import Path
from sdserve.jobs.local import SQLiteJobQueue
queue = SQLiteJobQueue(Path(sys.argv[1]))
print(queue.claim(wait_s=30, worker="doomed")[0].id, flush=True)
time.sleep(600)
"""


def test_a_killed_process_s_jobs_are_requeued_at_once_then_given_up(tmp_path):
    """SQLite, across processes on one host: a job whose claiming process was killed goes back to the queue at the
    next recover(), without waiting for its lease; after MAX_ATTEMPTS deliveries it fails with the reason."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "jobs.db"
    queue = SQLiteJobQueue(path, lease_s=600)
    job_id = submit(queue, "x").id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        worker = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdout.readline().strip() == job_id
            assert queue.recover() == 0  # its process runs: its lease holds
            assert queue.get(job_id).status is JobStatus.running and queue.get(job_id).attempts == attempt
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
        recovered = queue.recover()
        assert recovered == (1 if attempt < MAX_ATTEMPTS else 0)
    job = queue.get(job_id)
    assert job.status is JobStatus.failed and f"{MAX_ATTEMPTS} times" in job.error


def test_requeue_on_shutdown_does_not_count_an_attempt(queue):
    job = submit(queue, "x")
    queue.claim(wait_s=0)
    queue.requeue(job.id)
    assert queue.get(job.id).status is JobStatus.queued
    assert queue.get(job.id).attempts == 0


def test_each_owner_lists_only_its_own_jobs(make_queue):
    """Both backends: a caller's listing (and its status filter and pages) holds its own jobs only, newest first;
    the unfiltered listing (an admin's) holds everyone's."""
    queue = make_queue(max_queue=10)
    a1, b1, a2, b2, a3 = (queue.submit(JobRequest(prompt=p), owner=p[0])[0] for p in ("a1", "b1", "a2", "b2", "a3"))
    queue.claim(wait_s=0)  # a1 runs
    assert [j.id for j in queue.list(owner="a")] == [a3.id, a2.id, a1.id]
    assert [j.id for j in queue.list(owner="b")] == [b2.id, b1.id]
    assert [j.id for j in queue.list(owner="a", status="queued")] == [a3.id, a2.id]
    assert [j.id for j in queue.list(owner="a", status="running")] == [a1.id]
    assert [j.id for j in queue.list(owner="a", limit=1, offset=1)] == [a2.id]
    assert [j.id for j in queue.list(owner="a", status="queued", limit=1, offset=1)] == [a2.id]
    assert queue.list(owner="nobody") == []
    assert [j.id for j in queue.list()] == [a3.id, b2.id, a2.id, b1.id, a1.id]


def test_redis_indexes_the_owners_of_jobs_kept_from_before_the_index(redis_server):
    queue = redis_queue(redis_server)
    mine = queue.submit(JobRequest(prompt="x"), owner="a")[0]
    theirs = queue.submit(JobRequest(prompt="y"), owner="b")[0]
    client = redis_server.client()
    client.delete(*client.keys("sdserve:owned:*"))  # as a Redis written by a version without the index
    queue.close()
    from sdserve.jobs.redis import RedisJobQueue

    queue = RedisJobQueue(redis_server.url)  # a process of the version with it
    queue.expire()  # the periodic pass indexes them, once per Redis
    assert [j.id for j in queue.list(owner="a")] == [mine.id] and [j.id for j in queue.list(owner="b")] == [theirs.id]
    assert client.exists("sdserve:owned:indexed")
    queue.close()


def test_cancel(queue):
    queued, running = submit(queue, "q"), submit(queue, "r", priority=5)
    queue.claim(wait_s=0)
    assert queue.cancel(queued.id).status is JobStatus.canceled
    assert queue.cancel(running.id).status is JobStatus.running  # flagged; the runner stops it
    assert queue.canceled([running.id, queued.id]) == {running.id}
    queue.mark_canceled(running.id)
    with pytest.raises(JobFinished):
        queue.cancel(running.id)


def test_cancel_only_if_queued_leaves_a_running_job_alone(queue):
    queued, running = submit(queue, "q"), submit(queue, "r", priority=5)
    queue.claim(wait_s=0)
    assert queue.cancel(running.id, running=False).status is JobStatus.running
    assert queue.canceled([running.id]) == set()  # not even flagged: it finishes
    assert queue.cancel(queued.id, running=False).status is JobStatus.canceled


def test_expire_waiting_jobs(queue):
    job = queue.submit(JobRequest(prompt="x"), timeout_s=0.05)[0]
    time.sleep(0.1)
    expired = queue.expire()
    assert [j.id for j in expired] == [job.id]
    assert queue.get(job.id).error_kind == "timeout"


def test_succeed_records_images_and_progress(queue):
    job = submit(queue, "x", steps=4)
    queue.claim(wait_s=0)
    other = submit(queue, "y", steps=4)
    queue.claim(wait_s=0)
    queue.cancel(other.id)
    assert queue.progress([job.id, other.id], 2, 4).canceled == {other.id}  # a step reports who was canceled
    assert (queue.get(job.id).step, queue.get(job.id).progress) == (2, 0.5)
    assert queue.get(other.id).step == 0
    done = queue.succeed(job.id, [ImageRef(id="a" * 32, url="/api/v1/images/" + "a" * 32, seed=1)])
    assert done.status is JobStatus.succeeded and done.progress == 1.0 and done.images[0].seed == 1


def test_eta_uses_measured_speed(queue):
    submit(queue, "a", steps=10)
    second = submit(queue, "b", steps=10)
    assert queue.get(second.id).eta_s is None  # nothing measured yet
    queue.record_speed(0.1)
    assert queue.get(second.id).eta_s == pytest.approx(2.0)  # 10 steps ahead + its own 10
    assert queue.get(second.id).queue_position == 1


def test_every_backend_estimates_by_the_one_policy(queue):
    """The same jobs give the same numbers on each backend: jobs/policy.py's rules, not the backend's."""
    assert queue.retry_after_s() == policy.UNKNOWN_RETRY_S  # nothing measured yet
    first = submit(queue, "a", steps=10, n=2)  # 20 image-steps
    second, third = submit(queue, "b", steps=10), submit(queue, "c", steps=5)
    [running] = queue.claim(wait_s=0)
    assert running.id == first.id
    queue.record_speed(0.1)
    assert queue.progress([first.id], 4, 10, running.batch_id) == Stops(set(), set())
    left = policy.work_left(20, 10, 4)
    assert left == pytest.approx(12)
    assert queue.get(first.id).eta_s == pytest.approx(policy.running_eta(10, 4, 2, 0.1)) == pytest.approx(1.2)
    b, c = queue.get(second.id), queue.get(third.id)
    assert (b.queue_position, c.queue_position) == (0, 1)
    # ahead of c: its position times the queue's mean work ((10 + 5) / 2)
    assert b.eta_s == pytest.approx(policy.queued_eta(0, 2, 15, left, 10, 0.1)) == pytest.approx(2.2)
    assert c.eta_s == pytest.approx(policy.queued_eta(1, 2, 15, left, 5, 0.1)) == pytest.approx(2.45)
    assert queue.retry_after_s() == policy.retry_after_s(15, 0.1, 4) == 1
    queue.record_speed(0.2)  # blended with what was measured before
    assert queue.get(third.id).eta_s == pytest.approx(
        policy.queued_eta(1, 2, 15, left, 5, policy.blend_speed(0.1, 0.2)))
    queue.cancel(second.id)  # leaving the queue takes its work out of the total
    assert queue.get(third.id).eta_s == pytest.approx(
        policy.queued_eta(0, 1, 5, left, 5, policy.blend_speed(0.1, 0.2)))


# ---------------------------------------------------------------- leases, workers, events across processes
def test_an_expired_lease_is_delivered_again_then_gives_up(make_queue):
    q = make_queue(lease_s=1)
    job = submit(q, "x")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = q.claim(wait_s=1, worker=f"w{attempt}")
        assert [j.id for j in claimed] == [job.id] and claimed[0].attempts == attempt
        assert q.get(job.id).worker == f"w{attempt}"
        time.sleep(1.2)  # the worker died: no heartbeat
        q.expire()
    ended = q.get(job.id)
    assert ended.status is JobStatus.failed and f"{MAX_ATTEMPTS} times" in ended.error
    assert q.claim(wait_s=0) == [] and q.depth() == 0 and q.list(status="running") == []


def test_a_heartbeat_keeps_the_lease(make_queue):
    q = make_queue(lease_s=1)
    job = submit(q, "x")
    q.claim(wait_s=0, worker="w")
    for _ in range(4):
        time.sleep(0.4)
        q.heartbeat([job.id])
        q.expire()
    assert q.get(job.id).status is JobStatus.running and q.get(job.id).attempts == 1


def test_two_workers_never_claim_the_same_job(make_queue):
    a, b = make_queue(max_queue=100), make_queue(max_queue=100)  # two processes on the same data
    ids = {submit(a, str(i)).id for i in range(40)}
    got: dict[str, list[str]] = {"a": [], "b": []}

    def work(name, q):
        while True:
            claimed = q.claim(select=lambda c: c[:3], wait_s=0.2, worker=name)
            if not claimed:
                return
            got[name] += [j.id for j in claimed]

    threads = [threading.Thread(target=work, args=(n, q)) for n, q in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got["a"] + got["b"]) == sorted(ids) and not set(got["a"]) & set(got["b"])


def test_events_cross_processes_and_resume_after_an_id(make_queue):
    submitter = make_queue()
    watcher = make_queue()  # another process
    job = submit(submitter, "x", steps=3)

    async def watch(after=None, until="succeeded"):
        seen = []
        with watcher.events.subscribe(job.id, after=after) as events:
            while True:
                event = await asyncio.wait_for(events.get(), 10)
                seen.append(event)
                if event["type"] == until:
                    return seen

    async def scenario():
        first = asyncio.create_task(watch(after="0-0" if make_queue.backend == "redis" else "0", until="progress"))
        await asyncio.sleep(0.2)
        submitter.claim(wait_s=0)
        for step in (1, 2, 3):
            submitter.progress([job.id], step, 3)
        head = await first
        resumed = asyncio.create_task(watch(after=head[-1]["event_id"]))
        await asyncio.sleep(0.2)
        submitter.succeed(job.id, [])
        return head, await resumed

    head, rest = asyncio.run(scenario())
    assert [e["type"] for e in head] == ["queued", "started", "progress"]
    assert [(e["type"], e["step"]) for e in rest] == [("progress", 2), ("progress", 3), ("succeeded", 3)]
    assert len({e["event_id"] for e in head + rest}) == len(head + rest)  # no event twice


def demand_lag(server, q) -> int:
    """What KEDA's redis-streams scaler reads: the lag of the workers' group on the demand stream."""
    from sdserve.jobs.redis import DEMAND_GROUP

    return next(g["lag"] for g in server.client().xinfo_groups(q.demand_stream) if g["name"] == DEMAND_GROUP)


def test_the_autoscaler_lag_counts_the_queued_jobs(redis_server):
    """KEDA's redis-streams scaler (lagCount) reads XINFO GROUPS of sdserve:demand / workers: it must exist
    before any worker does, and its lag must equal the queued jobs through every way a job enters or leaves."""
    from sdserve.jobs.redis import DEMAND_GROUP

    q = redis_queue(redis_server, lease_s=1)
    q.ping()  # an API's start or readiness check creates the stream and group
    lag = functools.partial(demand_lag, redis_server, q)
    assert q.demand_stream == "sdserve:demand"
    assert [g["name"] for g in redis_server.client().xinfo_groups(q.demand_stream)] == [DEMAND_GROUP] and lag() == 0
    jobs = [submit(q, str(i), width=64 * (1 + i)) for i in range(4)]  # four shapes: one claim takes one job
    assert lag() == 4 == q.depth()
    first = q.claim(wait_s=0, worker="w")
    assert len(first) == 1 and lag() == 3
    q.cancel(jobs[3].id)  # a queued job canceled
    assert lag() == 2
    q.requeue(first[0].id)  # handed back
    assert lag() == 3
    claimed = q.claim(wait_s=0, worker="w")
    time.sleep(1.2)  # the worker died: its lease runs out and the job is queued again
    q.expire()
    assert q.get(claimed[0].id).status is JobStatus.queued and lag() == 3 == q.depth()
    while q.claim(wait_s=0, worker="w"):
        pass
    assert lag() == 0 == q.depth() and redis_server.client().xlen(q.demand_stream) == 0  # nothing left behind


def test_the_autoscaler_stream_comes_back_with_the_queued_jobs(redis_server):
    """Redis lost the stream (a restore, a FLUSH of one key): the next readiness check rebuilds it, counting
    the jobs still queued; jobs keep flowing meanwhile."""
    q = redis_queue(redis_server)
    q.ping()
    for i in range(3):
        submit(q, str(i))
    redis_server.client().delete(q.demand_stream)
    assert len(q.claim(wait_s=0, worker="w")) == 1  # no group: the claim still works
    q.ping()
    assert demand_lag(redis_server, q) == 2 == q.depth()


def test_a_key_prefix_keeps_deployments_on_one_redis_apart(redis_server):
    """SDSERVE_QUEUE_PREFIX: two deployments share a Redis; each sees its own jobs and its own KEDA stream."""
    from sdserve.jobs.redis import RedisJobQueue

    a = redis_queue(redis_server)
    b = RedisJobQueue(redis_server.url, prefix="team-b:")
    a.ping(), b.ping()
    job = submit(b, "b's")
    assert (a.depth(), b.depth(), demand_lag(redis_server, a), demand_lag(redis_server, b)) == (0, 1, 0, 1)
    assert b.demand_stream == "team-b:demand" and redis_server.client().exists(f"team-b:job:{job.id}")
    assert a.claim(wait_s=0, worker="w") == [] and [j.id for j in b.claim(wait_s=0, worker="w")] == [job.id]


def test_a_step_reports_a_job_that_ended_meanwhile_as_lost(queue):
    """The reaper timed it out (or, on Redis, another worker holds it now): the runner drops it, records nothing."""
    job = submit(queue, "x", steps=4)
    [claimed] = queue.claim(wait_s=0, worker="w")
    assert queue.progress([job.id], 1, 4, claimed.batch_id) == ({*()}, {*()})
    queue.fail(job.id, "timed out", "timeout")
    stops = queue.progress([job.id], 2, 4, claimed.batch_id)
    assert stops.lost == {job.id} and stops.canceled == set()


def test_a_lease_taken_over_by_another_batch_is_lost_to_the_first(redis_server):
    q = redis_queue(redis_server, lease_s=30)
    job = submit(q, "x")
    [first] = q.claim(wait_s=0, worker="a")
    q.requeue(job.id)  # as a lease that ran out while Redis was away
    [second] = q.claim(wait_s=0, worker="b")
    assert q.progress([job.id], 1, 4, first.batch_id).lost == {job.id}
    assert q.progress([job.id], 1, 4, second.batch_id).lost == set()


def test_after_an_outage_every_worker_gets_a_whole_lease_to_renew(redis_server):
    """While Redis was away nobody could heartbeat: a lease that ran out meanwhile is not taken at once."""
    q = redis_queue(redis_server, lease_s=1)
    job = submit(q, "x")
    q.claim(wait_s=0, worker="w")
    redis_server.shutdown()
    try:
        with pytest.raises(StorageError):
            q.expire()
        time.sleep(1.2)  # the outage outlasts the lease
        with pytest.raises(StorageError):
            q.expire()  # the reaper's last failed try, at the end of the outage
    finally:
        redis_server.start()
    q.expire()
    assert q.get(job.id).status is JobStatus.running  # its worker gets a lease's time to renew
    q.heartbeat([job.id])
    assert q.get(job.id).status is JobStatus.running
    time.sleep(1.2)  # no heartbeat for a whole lease, with Redis up: now the worker is gone
    q.expire()
    assert q.get(job.id).status is JobStatus.queued


def test_the_queued_work_is_recounted_where_redis_lacks_it(redis_server):
    q = redis_queue(redis_server)
    last = [submit(q, str(i), steps=10) for i in range(3)][-1]
    redis_server.client().delete("sdserve:queued_work")  # a Redis from before the total was kept
    q.claim(wait_s=0)  # one leaves the queue: counted from the queue, not subtracted from nothing
    q.record_speed(0.1)
    assert q.get(last.id).eta_s == pytest.approx(policy.queued_eta(1, 2, 20, 10, 10, 0.1)) == pytest.approx(3.0)


def test_previews_go_to_the_jobs_watchers_and_are_never_kept(make_queue):
    submitter, watcher = make_queue(), make_queue()  # the engine's process and an API replica
    job = submit(submitter, "x", steps=4)
    other = submit(submitter, "y", steps=4)
    preview = {"image": "AAAA", "media_type": "image/jpeg", "width": 8, "height": 8}

    async def scenario():
        with watcher.events.subscribe(job.id, after="0") as events:
            claimed = submitter.claim(wait_s=0, select=lambda jobs: jobs[:2])
            assert len(claimed) == 2
            submitter.progress([job.id, other.id], 1, 4, claimed[0].batch_id, {job.id: preview})
            while (event := await asyncio.wait_for(events.get(), 10))["type"] != "preview":
                pass
            return event

    event = asyncio.run(scenario())
    assert {k: event[k] for k in ("id", "step", "steps", "image", "width")} == {
        "id": job.id, "step": 1, "steps": 4, "image": "AAAA", "width": 8}
    assert watcher.latest_preview(job.id)["image"] == "AAAA" and watcher.latest_preview(other.id) is None
    submitter.progress([job.id], 2, 4, None, {job.id: {**preview, "image": "BBBB"}})
    assert watcher.latest_preview(job.id)["step"] == 2  # the latest only
    assert "AAAA" not in watcher.get(job.id).model_dump_json()  # not part of the job
    submitter.succeed(job.id, [])
    assert watcher.latest_preview(job.id) is None  # gone once the job ended

    async def replay() -> list[str]:
        with watcher.events.subscribe(job.id, after="0") as events:
            seen = []
            while not seen or seen[-1] != "succeeded":
                seen.append((await asyncio.wait_for(events.get(), 10))["type"])
            return seen

    assert "preview" not in asyncio.run(replay())  # and from its event log: progress stays, previews do not
