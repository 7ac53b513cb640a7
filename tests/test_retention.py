"""Retention: ended jobs and images older than --keep-jobs-days / --keep-images-days are deleted by the prune
loop. The job store's part on both backends (SQLite, real Redis); the image stores' part is in test_storage;
and a server whose history is pruned while it runs, paged through /api/v1/jobs."""

from __future__ import annotations

import re
import time

import pytest
from server import until, wait_for

from sdserve.jobs.queue import JobNotFound
from sdserve.schema import ImageRef, JobRequest, JobStatus


@pytest.fixture()
def queue(make_queue):
    return make_queue(max_queue=1000)


def test_prune_deletes_only_ended_jobs_older_than_the_cut(queue):
    def submit(prompt, key=None):
        return queue.submit(JobRequest(prompt=prompt), idempotency_key=key, fingerprint=prompt)[0]

    done, failed, canceled = submit("done", key="k-done"), submit("failed"), submit("canceled")
    running, waiting = submit("running"), submit("waiting")
    for job in queue.claim(select=lambda c: [j for j in c if j.request.prompt in ("done", "failed", "running")]):
        if job.id == done.id:
            queue.succeed(job.id, [ImageRef(id=f"{job.id}-0", url="/x", seed=1)])
        elif job.id == failed.id:
            queue.fail(job.id, "boom")
    queue.cancel(canceled.id)
    assert queue.prune(time.time() - 3600) == 0  # none ended an hour ago
    assert queue.prune(time.time() + 1, limit=2) == 2  # in slices
    assert queue.prune(time.time() + 1) == 1
    for job in (done, failed, canceled):
        with pytest.raises(JobNotFound):
            queue.get(job.id)
    assert queue.get(running.id).status is JobStatus.running and queue.get(waiting.id).status is JobStatus.queued
    assert {j.id for j in queue.list()} == {running.id, waiting.id}
    _, created = queue.submit(JobRequest(prompt="other"), idempotency_key="k-done", fingerprint="other")
    assert created  # the pruned job's idempotency key is free again
    assert queue.depth() == 2


def test_a_server_pages_through_its_history(models_dir, servers):
    server = servers(models_dir, "paging")
    with server.client() as c:
        ids = [c.post("/api/v1/jobs", json={"prompt": str(i), "steps": 1}).json()["id"] for i in range(5)]
        for i in ids:
            wait_for(c, i)
        first = c.get("/api/v1/jobs", params={"limit": 2})
        assert [j["id"] for j in first.json()] == ids[::-1][:2]
        assert first.headers["Link"] == '</api/v1/jobs?limit=2&offset=2>; rel="next"'
        last = c.get("/api/v1/jobs", params={"limit": 2, "offset": 4})
        assert [j["id"] for j in last.json()] == ids[:1] and "Link" not in last.headers


def test_a_server_prunes_its_history(models_dir, tmp_path, servers):
    """Jobs and images older than the retention go, while it runs. (Nothing here reads a job before it could be
    pruned: with a 3 s retention, a busy machine may prune a job before the test looks at it.)"""
    env = {"SDSERVE_KEEP_JOBS_DAYS": str(3 / 86400), "SDSERVE_KEEP_IMAGES_DAYS": str(3 / 86400),
           "SDSERVE_PRUNE_INTERVAL_S": "0.5"}
    server = servers(models_dir, tmp_path / "data", env=env)
    with server.client() as c:
        ids = [c.post("/api/v1/jobs", json={"prompt": str(i), "steps": 1}).json()["id"] for i in range(5)]
        until(lambda: not c.get("/api/v1/jobs").json(), "the history was never pruned", 300, server, every=0.5)
        for job_id in ids:
            assert c.get(f"/api/v1/jobs/{job_id}").status_code == 404
            assert c.get(f"/api/v1/images/{job_id}-0").status_code == 404
        assert not list((tmp_path / "data" / "images").rglob("*.png"))
    pruned = re.findall(r"retention: deleted (\d+) job\(s\) and (\d+) image\(s\)", server.log())
    assert [sum(int(p[i]) for p in pruned) for i in (0, 1)] == [5, 5]  # each job ran and stored its image
