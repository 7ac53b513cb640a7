"""End to end through HTTP against a real `sdserve serve` process with a tiny model at 64x64."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import statistics
import time

import httpx
import pytest
from PIL import Image
from server import until, wait_for

from sdserve import bounds
from sdserve.engine import infotext

BLOCKER = {"prompt": "blocker", "steps": 150, "seed": 1, "width": 256, "height": 256}  # seconds of work: keeps the runner busy


@pytest.fixture(scope="module")
def server(models_dir, module_servers):
    return module_servers(models_dir, "server")


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c


def start_blocker(client) -> str:
    job_id = client.post("/api/v1/jobs", json=BLOCKER).json()["id"]
    wait_for(client, job_id, ("running",))
    return job_id


def test_submit_poll_and_fetch_png_with_infotext(client):
    r = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 4, "seed": 7, "n": 2})
    assert r.status_code == 202
    assert r.headers["location"] == f"/api/v1/jobs/{r.json()['id']}"
    submitted = r.json()
    assert submitted["status"] in ("queued", "running")
    job = wait_for(client, submitted["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["step"] == job["steps"] == 4
    assert [i["seed"] for i in job["images"]] == [7, 8]
    assert job["started_at"] and job["finished_at"] and job["request"]["model"] == "tiny"
    png = client.get(job["images"][1]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64)
    params = infotext.parse(image.info["parameters"])
    assert (params["Prompt"], params["Seed"], params["Steps"]) == ("a red circle", "8", "4")


def test_sync_generate_returns_png(client):
    r = client.post("/api/v1/generate", json={"prompt": "x", "steps": 2, "seed": 3})
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.headers["x-seed"] == "3"


def read_sse(client, job_id: str) -> list[tuple[str, dict]]:
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((name, json.loads(line.split(":", 1)[1])))
                if name in ("succeeded", "failed", "canceled"):
                    break
    return events


def test_sse_event_sequence(client):
    blocker = start_blocker(client)
    job_id = client.post("/api/v1/jobs", json={"prompt": "sse", "steps": 5}).json()["id"]
    client.delete(f"/api/v1/jobs/{blocker}")  # let it start soon
    events = read_sse(client, job_id)
    names = [n for n, _ in events]
    assert names[0] == "queued"
    assert names[1] == "started"
    assert names[2:-1] == ["progress"] * 5
    assert [e["step"] for n, e in events if n == "progress"] == [1, 2, 3, 4, 5]
    assert names[-1] == "succeeded" and events[-1][1]["images"]
    # A subscriber that arrives after the end gets the end at once.
    late = read_sse(client, job_id)
    assert [n for n, _ in late] == ["succeeded"]


def test_cancel_queued_and_running(client):
    running = start_blocker(client)
    queued = client.post("/api/v1/jobs", json={"prompt": "never", "steps": 2}).json()["id"]
    r = client.delete(f"/api/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    client.delete(f"/api/v1/jobs/{running}")
    job = wait_for(client, running)
    assert job["status"] == "canceled" and job["step"] < 150 and not job["images"]
    # Canceling what already ended is a conflict; an unknown id is 404.
    assert client.delete(f"/api/v1/jobs/{running}").status_code == 409
    assert client.delete("/api/v1/jobs/nope").status_code == 404
    assert client.get("/api/v1/jobs/nope").status_code == 404
    assert wait_for(client, queued)["status"] == "canceled"


def test_queue_position_and_priority(client):
    blocker = start_blocker(client)
    # Different shapes, so they cannot share a batch and the order shows.
    low = client.post("/api/v1/jobs", json={"prompt": "low", "steps": 3}).json()
    high = client.post("/api/v1/jobs", json={"prompt": "high", "steps": 2, "priority": 10}).json()
    assert client.get(f"/api/v1/jobs/{low['id']}").json()["queue_position"] == 1
    assert client.get(f"/api/v1/jobs/{high['id']}").json()["queue_position"] == 0
    client.delete(f"/api/v1/jobs/{blocker}")
    low_done, high_done = wait_for(client, low["id"]), wait_for(client, high["id"])
    assert high_done["started_at"] < low_done["started_at"]


def test_idempotency_key(client):
    body = {"prompt": "idem", "steps": 2}
    first = client.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other = client.post("/api/v1/jobs", json={**body, "steps": 3}, headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"prompt": "x", "width": 65}, "width"), ({"prompt": "x", "steps": 0}, "steps"),
     ({"prompt": "x", "n": 9}, "n"), ({"prompt": "x" * 4001}, "prompt"), ({"prompt": "x", "typo": 1}, "typo"),
     ({"prompt": "x", "sampler": "Euler b"}, "sampler"), ({"prompt": "x", "model": "nope"}, "model"),
     ({"prompt": "x", "init_image": "bm90IGFuIGltYWdl"}, "init_image")],
)
def test_bad_input_is_422_naming_the_field(client, body, field):
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 422
    assert r.json()["errors"][0]["field"] == field
    assert field in r.json()["detail"]


def test_malformed_json_and_huge_body(client):
    assert client.post("/api/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    r = client.post("/api/v1/jobs", content=b"x" * (21 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_job_timeout(client):
    blocker = start_blocker(client)
    job_id = client.post("/api/v1/jobs", json={"prompt": "t", "steps": 2, "timeout_s": 1}).json()["id"]
    job = wait_for(client, job_id)
    client.delete(f"/api/v1/jobs/{blocker}")
    assert job["status"] == "failed" and job["error_kind"] == "timeout" and "timed out" in job["error"]


def test_seed_routes(client):
    r = client.get("/", params={"prompt": "robots dancing", "steps": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    r = client.post("/generate", json={"prompt": "a cat", "scale": 7.5, "steps": 2, "seed": 1})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"download_id", "time"} and body["time"] > 0
    png = client.get(f"/download/{body['download_id']}")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.post("/generate", json={"prompt": "x", "steps": "many"}).status_code == 422


@pytest.mark.parametrize(
    "path",
    ["/download/abc", "/download/" + "0" * 32, "/download/..%2F..%2Fetc%2Fpasswd", "/download/%2e%2e%2fjobs.db",
     "/download/..", "/download/%00", "/api/v1/images/..%2Fjobs.db"],
)
def test_download_traversal_is_404_json(server, path):
    # http.client sends the path byte for byte (httpx would normalise "/download/.." to "/").
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    assert response.status == 404, (path, body[:100])
    assert "detail" in json.loads(body)


def test_healthz_stays_fast_while_generating(client):
    blocker = start_blocker(client)
    latencies = []
    for _ in range(20):
        started = time.perf_counter()
        assert client.get("/healthz").status_code == 200
        latencies.append(time.perf_counter() - started)
    assert client.get(f"/api/v1/jobs/{blocker}").json()["status"] == "running"  # it really was generating
    client.delete(f"/api/v1/jobs/{blocker}")
    assert statistics.median(latencies) < 0.1, latencies


def test_hundred_concurrent_submissions_all_complete(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            responses = await asyncio.gather(*[
                c.post("/api/v1/jobs", json={"prompt": f"p{i}", "steps": 1, "seed": i}) for i in range(100)
            ])
            return [r.status_code for r in responses], [r.json()["id"] for r in responses]

    codes, ids = asyncio.run(main())
    assert codes == [202] * 100 and len(set(ids)) == 100
    with server.client() as c:
        jobs = [wait_for(c, job_id) for job_id in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 100


def test_metrics(client):
    client.post("/api/v1/generate", json={"prompt": "m", "steps": 1})
    text = client.get("/metrics").text
    for name in ("sdserve_requests_total{", "sdserve_queue_depth", "sdserve_jobs_total{label=\"anonymous\",status=\"succeeded\"}",
                 "sdserve_job_queue_seconds_bucket", "sdserve_job_run_seconds_bucket", "sdserve_images_total",
                 "sdserve_batch_images_bucket"):
        assert name in text, name
    assert 'route="/api/v1/generate"' in text
    line = next(l for l in text.splitlines() if l.startswith("sdserve_images_total"))
    assert float(line.split()[-1]) >= 1


def job_log_line(server, job_id: str, status: str) -> dict:
    """The structured log line of a job's end, once the server has written it."""
    def written() -> dict | None:
        for line in server.log().splitlines():
            if "sdserve.jobs: " in line:
                entry = json.loads(line.split("sdserve.jobs: ", 1)[1])
                if entry["id"] == job_id and entry["status"] == status:
                    return entry
        return None

    return until(written, f"no log line for job {job_id}")


def test_structured_job_log(server, client):
    job_id = client.post("/api/v1/jobs", json={"prompt": "log me", "steps": 2}).json()["id"]
    wait_for(client, job_id)
    mine = job_log_line(server, job_id, "succeeded")
    assert mine["model"] == "tiny" and mine["steps"] == 2 and mine["mode"] == "txt2img"
    assert mine["queue_wait_s"] is not None and mine["run_s"] > 0
    image = base64.b64encode(client.get(client.get(f"/api/v1/jobs/{job_id}").json()["images"][0]["url"]).content)
    modes = {}
    for mode, extra in (("img2img", {}), ("inpaint", {"mask": image.decode()})):
        job = client.post("/api/v1/jobs", json={"prompt": mode, "steps": 2, "init_image": image.decode(), **extra})
        modes[mode] = job.json()["id"]
    for mode, mode_job in modes.items():
        wait_for(client, mode_job)
        assert job_log_line(server, mode_job, "succeeded")["mode"] == mode


def test_readyz_and_openapi(client):
    assert client.get("/readyz").json()["status"] == "ready"
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/events", "/api/v1/images/{image_id}",
                 "/api/v1/generate", "/", "/generate", "/download/{download_id}", "/healthz", "/readyz", "/metrics"):
        assert path in paths, path


def test_workers_lists_this_process(client):
    [worker] = client.get("/api/v1/workers").json()
    assert worker["ready"] is True and worker["model"] == "tiny" and worker["device"] == "cpu"
    assert worker["last_heartbeat"] > 0 and isinstance(worker["batch"], list)
    assert "sdserve_workers 1.0" in client.get("/metrics").text


def test_the_limits_route_says_the_operators_bounds(models_dir, servers):
    server = servers(models_dir, "tight", env={"SDSERVE_MAX_STEPS": "30", "SDSERVE_MAX_SIZE": "512"})
    limits = httpx.get(server.url + "/api/v1/limits").json()
    assert (limits["max_steps"], limits["max_size"], limits["max_images"]) == (30, 512, bounds.MAX_IMAGES)
    assert (limits["min_size"], limits["size_step"], limits["default_steps"]) == (
        bounds.MIN_SIZE, bounds.SIZE_STEP, bounds.DEFAULT_STEPS)
    for body, field in (({"prompt": "x", "steps": 31}, "steps"), ({"prompt": "x", "width": 520}, "width")):
        r = httpx.post(server.url + "/api/v1/jobs", json=body)
        assert r.status_code == 422 and field in r.json()["detail"], r.text
