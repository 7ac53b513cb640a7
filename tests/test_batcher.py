"""Dynamic batching: grouping, fairness, correctness of batched images, cancel inside a batch."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import numpy as np
import pytest
import tolerance
from server import wait_for

from sdserve.jobs import batcher
from sdserve.schema import Job, JobRequest, JobStatus

NOW = datetime.now(timezone.utc)


def job(i: int, n: int = 1, **kw) -> Job:
    return Job(id=f"j{i}", status=JobStatus.queued, request=JobRequest(prompt=f"p{i}", n=n, **kw), created_at=NOW)


# ---------------------------------------------------------------- the pure selection
def test_same_shape_groups_and_each_keeps_its_prompt_seed_and_guidance_scale():
    a, b = JobRequest(prompt="a", seed=1), JobRequest(prompt="b", seed=2, negative_prompt="x", cfg_scale=3.5)
    assert batcher.batch_key(a) == batcher.batch_key(b)


@pytest.mark.parametrize("change", [{"steps": 21}, {"width": 512}, {"sampler": "Euler"}, {"scheduler": "exponential"},
                                    {"cfg_scale": 1.0}, {"clip_skip": 2}, {"model": "other"}])
def test_shape_changes_split(change):
    assert batcher.batch_key(JobRequest(prompt="a")) != batcher.batch_key(JobRequest(prompt="a", **change))


def test_a_batch_lingers_only_for_companions_that_can_come():
    from datetime import timedelta

    from sdserve.jobs.runner import Runner

    runner = Runner(None, None, None, None, max_batch=16)
    assert runner._companions([job(0)]) == 16  # before any batch: wait for the most
    ended = NOW.timestamp()
    runner._last_batch = (1, ended)
    later = job(1).model_copy(update={"created_at": NOW + timedelta(seconds=1)})
    assert runner._companions([later]) == 1  # a lone client's next job: nobody to wait for
    during = job(2).model_copy(update={"created_at": NOW - timedelta(seconds=0.1)})
    assert runner._companions([during]) == 2  # another client arrived while it ran: its first client may be back
    runner._last_batch = (16, ended)
    assert runner._companions([later]) == 16  # sixteen clients in step
    assert runner._companions([job(3, n=8).model_copy(update={"created_at": NOW - timedelta(seconds=1)})]) == 16


def test_aliases_and_legacy_names_batch_together():
    plain = JobRequest(prompt="a", sampler="DPM++ 2M", scheduler="karras")
    legacy = JobRequest(prompt="b", sampler="DPM++ 2M Karras")
    alias = JobRequest(prompt="c", sampler="k_dpmpp_2m", scheduler="Karras")
    assert batcher.batch_key(plain) == batcher.batch_key(legacy) == batcher.batch_key(alias)
    # "Automatic" is Karras for this sampler, but SGM Uniform on a zero-terminal-SNR model: which one only the
    # model says, so it never shares a pass with an explicit Karras
    automatic = JobRequest(prompt="d", sampler="k_dpmpp_2m")
    assert batcher.batch_key(automatic) == batcher.batch_key(JobRequest(prompt="e")) != batcher.batch_key(plain)


def test_select_fills_up_to_max_images_counting_n():
    queue = [job(0, n=2), job(1, steps=5), job(2, n=4), job(3, n=3), job(4, n=2), job(5)]
    chosen = batcher.select(queue, max_images=8)
    assert [j.id for j in chosen] == ["j0", "j2", "j4"]  # j1 other shape; j3 would overflow (2+4+3 > 8)
    assert batcher.images_in(chosen) == 8


def test_head_runs_even_when_larger_than_max():
    assert [j.id for j in batcher.select([job(0, n=8), job(1)], max_images=4)] == ["j0"]


def run_to_empty(queue: list[Job], max_images: int) -> dict[str, int]:
    """Simulate the runner: batches taken until the queue is empty; how many batches ran before each job's."""
    waited, batches = {}, 0
    while queue:
        chosen = batcher.select(queue, max_images)
        for j in chosen:
            waited[j.id] = batches
        queue = [j for j in queue if j not in chosen]
        batches += 1
    return waited


def test_no_job_waits_behind_more_batches_than_jobs_ahead_of_it():
    rng = random.Random(0)
    shapes = [{"steps": 20}, {"steps": 30}, {"width": 512, "height": 512}, {"sampler": "Euler a"}]
    # A popular shape and rare ones, mixed: the rare ones must not starve.
    queue = [job(i, n=rng.choice([1, 1, 2, 4]), **(shapes[0] if rng.random() < 0.7 else rng.choice(shapes[1:])))
             for i in range(300)]
    waited = run_to_empty(list(queue), max_images=8)
    for position, j in enumerate(queue):
        assert waited[j.id] <= position
    # And the bound is far from the worst case: rare jobs are served within a few batches of their turn.
    rare = [j for j in queue if batcher.batch_key(j.request) != batcher.batch_key(queue[0].request)]
    assert rare and max(waited[j.id] for j in rare) < len(queue) // 2


def test_default_max_batch():
    assert batcher.default_max_batch("cuda") == 8 and batcher.default_max_batch("cpu") >= 8


# ---------------------------------------------------------------- correctness on the real engine
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a", "DPM++ 2M SDE"])
def test_batched_images_equal_the_job_run_alone(engine, sampler):
    jobs = [JobRequest(prompt="a red circle", seed=10, n=2, steps=6, sampler=sampler),
            JobRequest(prompt="blue (square:1.3)", negative_prompt="red", seed=99, steps=6, sampler=sampler,
                       cfg_scale=12),
            JobRequest(prompt="green", seed=5, n=3, steps=6, sampler=sampler, cfg_scale=2.5)]
    together = engine.run(jobs)
    for request, batched in zip(jobs, together):
        alone = engine.run([request])[0]
        assert [g.seed for g in batched] == [g.seed for g in alone] == list(range(request.seed, request.seed + request.n))
        for b, a in zip(batched, alone):
            assert np.abs(b.pixels - a.pixels).max() <= tolerance.FLOAT
            assert b.infotext == a.infotext


# ---------------------------------------------------------------- end to end, through the server
@pytest.fixture(scope="module")
def batching_server(models_dir, module_servers):
    return module_servers(models_dir, "batching", "--max-batch", "8",
                          "--batch-wait-ms", "50")


BLOCKER = {"prompt": "blocker", "steps": 150, "width": 256, "height": 256, "seed": 1}


def test_queued_jobs_of_one_shape_run_as_one_batch(batching_server):
    with batching_server.client() as c:
        blocker = c.post("/api/v1/jobs", json=BLOCKER).json()["id"]
        wait_for(c, blocker, ("running",))
        ids = [c.post("/api/v1/jobs", json={"prompt": f"p{i}", "steps": 4, "n": 1 + i % 2, "seed": i}).json()["id"]
               for i in range(4)]
        odd = c.post("/api/v1/jobs", json={"prompt": "odd", "steps": 5}).json()["id"]
        c.delete(f"/api/v1/jobs/{blocker}")
        jobs = [wait_for(c, i) for i in ids]
        other = wait_for(c, odd)
    assert {j["status"] for j in jobs} == {"succeeded"}
    assert len({j["batch_id"] for j in jobs}) == 1 and jobs[0]["batch_images"] == 6
    assert other["batch_id"] != jobs[0]["batch_id"] and other["batch_images"] == 1
    assert [len(j["images"]) for j in jobs] == [1, 2, 1, 2]


def test_cancel_one_job_in_a_running_batch(batching_server):
    long = {"steps": 150, "width": 256, "height": 256}
    with batching_server.client() as c:
        blocker = c.post("/api/v1/jobs", json={**BLOCKER, "steps": 149}).json()["id"]
        wait_for(c, blocker, ("running",))
        ids = [c.post("/api/v1/jobs", json={"prompt": f"b{i}", "seed": i, **long}).json()["id"] for i in range(3)]
        c.delete(f"/api/v1/jobs/{blocker}")
        wait_for(c, ids[1], ("running",), predicate=lambda j: j["step"] >= 2)
        assert c.delete(f"/api/v1/jobs/{ids[1]}").status_code == 200
        canceled = wait_for(c, ids[1])
        assert canceled["status"] == "canceled" and not canceled["images"]
        still = c.get(f"/api/v1/jobs/{ids[0]}").json()
        assert still["status"] == "running" and still["step"] < 150  # the others go on
        done = [wait_for(c, ids[0]), wait_for(c, ids[2], timeout=180)]
    assert [d["status"] for d in done] == ["succeeded", "succeeded"]
    assert len({canceled["batch_id"], done[0]["batch_id"], done[1]["batch_id"]}) == 1


def test_fair_share_splits_the_queue_between_idle_workers():
    jobs = [Job(id=str(i), status=JobStatus.queued, request=JobRequest(prompt="x", n=1),
                created_at=datetime.now(timezone.utc)) for i in range(10)]
    assert batcher.fair_share(jobs, 16, 1) == 10  # alone: everything, up to the batch limit
    assert batcher.fair_share(jobs, 16, 2) == 5
    assert batcher.fair_share(jobs, 4, 2) == 4  # never past the batch limit
    assert batcher.fair_share(jobs[:1], 16, 3) == 1  # at least one
    assert batcher.fair_share(jobs, 16, 0) == 10  # no registrations seen yet: as if alone

