"""Servers with their own settings: a small queue, API keys, restarts and crashes."""

from __future__ import annotations

import httpx
from server import ServerProcess, until, wait_for

BLOCKER = {"prompt": "blocker", "steps": 150, "seed": 1, "width": 256, "height": 256}


def test_full_queue_is_429_with_retry_after(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path, "--max-queue", "2").start()
    try:
        with server.client() as c:
            blocker = c.post("/api/v1/jobs", json=BLOCKER).json()["id"]
            wait_for(c, blocker, ("running",))
            assert c.post("/api/v1/jobs", json={"prompt": "a", "steps": 1}).status_code == 202
            assert c.post("/api/v1/jobs", json={"prompt": "b", "steps": 1}).status_code == 202
            full = c.post("/api/v1/jobs", json={"prompt": "c", "steps": 1})
            assert full.status_code == 429
            assert int(full.headers["retry-after"]) >= 1
            assert "queue is full" in full.json()["detail"]
            # The synchronous routes share the same bound.
            assert c.get("/", params={"prompt": "d"}).status_code == 429
            c.delete(f"/api/v1/jobs/{blocker}")
    finally:
        server.terminate()


def test_api_keys(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path, "--api-key", "alpha", env={"SDSERVE_API_KEYS": "beta"}).start()
    try:
        url = server.url
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 200
        assert httpx.get(url + "/").status_code == 200  # the UI page loads, then asks for a key
        for path in ("/api/v1/jobs", "/metrics", "/?prompt=x", "/openapi.json", "/download/" + "0" * 32):
            r = httpx.get(url + path)
            assert r.status_code == 401, path
            assert "API key" in r.json()["detail"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(url + "/api/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/api/v1/jobs", headers={"Authorization": "Bearer alpha"}).status_code == 200
        assert httpx.get(url + "/api/v1/jobs", headers={"X-API-Key": "alpha"}).status_code == 200
        # The flag wins over the environment (the same rule as every other setting).
        assert httpx.get(url + "/api/v1/jobs", headers={"X-API-Key": "beta"}).status_code == 401
        assert "alpha" not in server.log()
    finally:
        server.terminate()


def test_api_keys_from_environment(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path, env={"SDSERVE_API_KEYS": "k1,k2"}).start()
    try:
        assert httpx.get(server.url + "/api/v1/jobs").status_code == 401
        assert httpx.get(server.url + "/api/v1/jobs", headers={"X-API-Key": "k2"}).status_code == 200
    finally:
        server.terminate()


def test_sigterm_finishes_running_job_and_queued_jobs_resume_after_restart(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path).start()
    with server.client() as c:
        running = c.post("/api/v1/jobs", json={"prompt": "r", "steps": 40, "width": 256, "height": 256}).json()["id"]
        wait_for(c, running, ("running",))
        queued = [c.post("/api/v1/jobs", json={"prompt": f"q{i}", "steps": 2}).json()["id"] for i in range(5)]
    # uvicorn re-raises SIGTERM after its clean shutdown, so the exit status is -15 either way.
    server.terminate()
    assert "Application shutdown complete" in server.log()
    restarted = ServerProcess(models_dir, tmp_path).start()
    try:
        with restarted.client() as c:
            finished = wait_for(c, running)
            assert finished["status"] == "succeeded" and finished["attempts"] == 1  # finished before the exit
            jobs = [wait_for(c, job_id) for job_id in queued]
            assert [j["status"] for j in jobs] == ["succeeded"] * 5
    finally:
        restarted.terminate()


def test_crash_while_running_reruns_the_job(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path).start()
    with server.client() as c:
        job_id = c.post("/api/v1/jobs", json={**BLOCKER, "prompt": "crash"}).json()["id"]
        wait_for(c, job_id, ("running",), predicate=lambda j: j["step"] >= 1)
    server.kill()  # SIGKILL: no chance to clean up
    restarted = ServerProcess(models_dir, tmp_path).start()
    try:
        with restarted.client() as c:
            assert c.get(f"/api/v1/jobs/{job_id}").json()["status"] in ("queued", "running")
            c.delete(f"/api/v1/jobs/{job_id}")  # it was re-run; no need to wait out 150 steps
            job = wait_for(c, job_id)
            assert job["attempts"] == 2 and job["status"] == "canceled"
    finally:
        restarted.terminate()


def test_job_that_keeps_crashing_fails_after_three_attempts(models_dir, tmp_path):
    job_id = None
    for attempt in range(3):
        server = ServerProcess(models_dir, tmp_path).start()
        with server.client() as c:
            if job_id is None:
                job_id = c.post("/api/v1/jobs", json={**BLOCKER, "prompt": "poison"}).json()["id"]
            wait_for(c, job_id, ("running",), predicate=lambda j: j["step"] >= 1)
        server.kill()
    server = ServerProcess(models_dir, tmp_path).start()
    try:
        with server.client() as c:
            job = c.get(f"/api/v1/jobs/{job_id}").json()
            assert job["status"] == "failed" and job["attempts"] == 3
            assert "3 times" in job["error"]
    finally:
        server.terminate()


def test_sigterm_answers_waiting_synchronous_calls_503_and_ends_within_its_grace(models_dir, tmp_path):
    """A client waiting on a synchronous call gets its dialect's 503 with Retry-After (not uvicorn's bare 500),
    its job is canceled (its client was told to send it again), and the process ends within the grace even
    though a batch longer than the grace was running (it goes back to the queue)."""
    import threading
    import time
    from datetime import datetime

    server = ServerProcess(models_dir, tmp_path, env={"SDSERVE_SHUTDOWN_GRACE_S": "3"}).start()
    answers: dict = {}

    def call(name: str, method: str, path: str, body: dict) -> None:
        answers[name] = httpx.request(method, server.url + path, json=body, timeout=120)

    with server.client() as c:
        asynchronous = c.post("/api/v1/jobs", json={**BLOCKER, "prompt": "async"}).json()["id"]
        wait_for(c, asynchronous, ("running",))
        threads = [threading.Thread(target=call, args=args) for args in (
            ("native", "POST", "/api/v1/generate", {"prompt": "sync", "steps": 2}),
            ("a1111", "POST", "/sdapi/v1/txt2img", {"prompt": "sync", "steps": 2}),
            ("openai", "POST", "/v1/images/generations", {"prompt": "sync"}))]
        for t in threads:
            t.start()
        until(lambda: len(c.get("/api/v1/jobs", params={"status": "queued"}).json()) >= 3,
              "the synchronous calls never queued", 120, server)
    started = time.monotonic()
    server.proc.send_signal(__import__("signal").SIGTERM)
    for t in threads:
        t.join(60)
    server.proc.wait(60)
    # The grace (3 s) bounds the batch; the rest is start-up and exit work, slower on a busy machine.
    assert time.monotonic() - started < 3 + 30, "the process outlived its grace"
    exited_at, stored_at_exit = time.time(), list(tmp_path.rglob(f"{asynchronous}-*"))
    for name, shape in (("native", "detail"), ("a1111", "errors"), ("openai", "error")):
        r = answers[name]
        assert r.status_code == 503 and r.headers.get("Retry-After"), (name, r.status_code, r.text[:200])
        assert shape in r.json(), (name, r.text)
    restarted = ServerProcess(models_dir, tmp_path).start()
    try:
        with restarted.client() as c:
            jobs = c.get("/api/v1/jobs", params={"limit": 10}).json()
            sync = [j for j in jobs if j["request"]["prompt"] == "sync"]
            assert len(sync) == 3 and all(j["status"] == "canceled" for j in sync), [j["status"] for j in sync]
            # The async batch outlived the grace (unless a fast machine finished it within): it went back to the
            # queue whole, with nothing of it stored at the exit; once it ends it has no image, or exactly its one.
            assert c.get(f"/api/v1/jobs/{asynchronous}").json()["status"] in ("queued", "running", "succeeded")
            c.delete(f"/api/v1/jobs/{asynchronous}")
            ended = wait_for(c, asynchronous)
            stored = list(tmp_path.rglob(f"{asynchronous}-*"))
            assert len(stored) == len(ended["images"]) == (1 if ended["status"] == "succeeded" else 0), (ended, stored)
            done_before_exit = ended["status"] == "succeeded" and datetime.fromisoformat(
                ended["finished_at"]).timestamp() <= exited_at
            assert len(stored_at_exit) == (1 if done_before_exit else 0), (ended, stored_at_exit)
    finally:
        restarted.terminate()


def test_a_killed_engine_process_is_restarted_and_its_jobs_run_again_once(models_dir, tmp_path):
    """`serve` runs its engine in a process of its own: kill -9 it mid-batch and the server says why it is not
    ready, restarts it, and the jobs it held run again, each ending once, with each image stored once; jobs
    queued meanwhile are kept. The API process itself never stops answering."""
    import os
    import signal
    import sqlite3

    server = ServerProcess(models_dir, tmp_path).start()
    try:
        with server.client() as c:
            held = c.post("/api/v1/jobs", json={**BLOCKER, "prompt": "held", "steps": 30, "n": 2}).json()["id"]
            wait_for(c, held, ("running",), predicate=lambda j: j["step"] >= 1)
            queued = c.post("/api/v1/jobs", json={"prompt": "queued", "steps": 2}).json()["id"]
            [engine] = c.get("/api/v1/workers").json()
            assert engine["pid"] != server.proc.pid and engine["batch"] == [held]
            os.kill(engine["pid"], signal.SIGKILL)
            reason = until(lambda: (r := c.get("/readyz")).status_code == 503 and r.json()["reason"],
                           "readiness never said the engine died", 120, server)
            assert "killed by SIGKILL" in reason and "restarting" in reason
            assert c.post("/api/v1/jobs", json={"prompt": "meanwhile", "steps": 2}).status_code == 202
            until(lambda: c.get("/readyz").status_code == 200, "the engine never came back", 300, server)
            [restarted] = c.get("/api/v1/workers").json()
            assert restarted["pid"] not in (engine["pid"], server.proc.pid)
            job = wait_for(c, held)
            assert job["status"] == "succeeded" and job["attempts"] == 2, job
            assert wait_for(c, queued)["status"] == "succeeded"
        assert len(list(tmp_path.rglob(f"{held}-*"))) == 2  # its two images, each stored once
        with sqlite3.connect(tmp_path / "jobs.db") as db:
            kinds = [row[0] for row in db.execute(
                "SELECT json_extract(data, '$.type') FROM events WHERE job_id = ? AND "
                "json_extract(data, '$.type') != 'progress' ORDER BY id", (held,))]
        assert kinds == ["queued", "started", "started", "succeeded"], kinds
    finally:
        server.terminate()


def test_engine_processes_split_the_cpu_and_share_the_queue(models_dir, tmp_path):
    """--workers 2: two engine processes, listed with their own pids, each taking jobs from the one queue."""
    server = ServerProcess(models_dir, tmp_path, "--workers", "2", "--max-batch", "1").start()
    try:
        with server.client() as c:
            until(lambda: sum(w["ready"] for w in c.get("/api/v1/workers").json()) == 2, "two ready engines", 300,
                  server)
            workers = c.get("/api/v1/workers").json()
            assert len({w["pid"] for w in workers}) == 2 and server.proc.pid not in {w["pid"] for w in workers}
            ids = [c.post("/api/v1/jobs", json={"prompt": f"p{i}", "steps": 6, "seed": i}).json()["id"]
                   for i in range(8)]
            jobs = [wait_for(c, job_id) for job_id in ids]
            assert all(j["status"] == "succeeded" for j in jobs)
            assert {j["worker"] for j in jobs} == {w["name"] for w in workers}
    finally:
        server.terminate()
