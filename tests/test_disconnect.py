"""A synchronous client that hangs up: its queued job is canceled (not run for nobody); a running one finishes,
or with --on-disconnect cancel stops. Real server, real HTTP clients that time out and close the connection."""

from __future__ import annotations

import httpx
import pytest
from server import ServerProcess, until

LONG = {"prompt": "busy", "steps": 150, "width": 256, "height": 256}  # seconds of work on the tiny model


def jobs_by_prompt(server, prompt):
    return [j for j in httpx.get(f"{server.url}/api/v1/jobs", params={"limit": 200}).json()
            if j["request"]["prompt"] == prompt]


def wait_status(server, prompt, wanted):
    def reached():
        found = jobs_by_prompt(server, prompt)
        return found[0] if found and found[0]["status"] in wanted else None

    return until(reached, lambda: f"{prompt}: {jobs_by_prompt(server, prompt)}", 300, server, every=0.1)


def hang_up(server, method, path, read=1.0, **kwargs):
    with pytest.raises(httpx.ReadTimeout):
        httpx.request(method, server.url + path, timeout=httpx.Timeout(10, read=read), **kwargs)


def wait_idle(server):
    """Until no job runs (a job canceled while running stops at its next step, which takes a while when busy)."""
    until(lambda: not httpx.get(f"{server.url}/api/v1/jobs", params={"status": "running"}).json(),
          "a job kept running", 300, server, every=0.1)


@pytest.fixture(scope="module")
def one_at_a_time(models_dir, module_servers):
    return module_servers(models_dir, "disconnect", "--max-batch", "1")


@pytest.mark.parametrize("method, path, kwargs", [
    ("POST", "/api/v1/generate", {"json": {"prompt": "gone-native", "steps": 2}}),
    ("GET", "/", {"params": {"prompt": "gone-simple", "steps": 2}}),
    ("POST", "/sdapi/v1/txt2img", {"json": {"prompt": "gone-a1111", "steps": 2}}),
    ("POST", "/v1/images/generations", {"json": {"prompt": "gone-openai", "size": "256x256", "steps": 2}}),
])
def test_a_queued_job_whose_client_left_is_canceled(one_at_a_time, method, path, kwargs):
    with httpx.Client(base_url=one_at_a_time.url, timeout=30) as c:
        busy = c.post("/api/v1/jobs", json=LONG).json()  # keeps the runner busy
        prompt = (kwargs.get("json") or kwargs.get("params"))["prompt"]
        hang_up(one_at_a_time, method, path, **kwargs)
        canceled = wait_status(one_at_a_time, prompt, {"canceled", "succeeded", "failed"})
        assert canceled["status"] == "canceled" and canceled["started_at"] is None
        c.delete(f"/api/v1/jobs/{busy['id']}")


def test_a_running_job_finishes_by_default(one_at_a_time):
    # The runner idle first, so the job starts at once and is running when its client leaves 2 s later (a queued
    # one would be canceled: the other rule). 150 steps outlast 2 s on any machine; the wait below is by state.
    wait_idle(one_at_a_time)
    hang_up(one_at_a_time, "POST", "/api/v1/generate", read=2.0, json={**LONG, "prompt": "finish-me"})
    assert wait_status(one_at_a_time, "finish-me", {"running", "succeeded"})["status"] in ("running", "succeeded")
    assert wait_status(one_at_a_time, "finish-me", {"succeeded", "canceled", "failed"})["status"] == "succeeded"


def test_on_disconnect_cancel_stops_a_running_job(models_dir, tmp_path):
    proc = ServerProcess(models_dir, tmp_path, "--on-disconnect", "cancel").start()
    try:
        hang_up(proc, "POST", "/api/v1/generate", json={**LONG, "prompt": "stop-me"})
        job = wait_status(proc, "stop-me", {"succeeded", "canceled", "failed"})
        assert job["status"] == "canceled" and job["started_at"] is not None and job["step"] < 150
    finally:
        proc.terminate()
