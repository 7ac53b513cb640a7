"""Two `sdserve api` replicas (torch and diffusers unimportable) and two `sdserve worker`s (A and B) on one Redis
(`--queue redis://…`) and one image store. Every route works through either replica; a killed worker's job
finishes on the other."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from server import ServerProcess, until, wait_for

LONG = {"prompt": "long", "steps": 150, "seed": 1, "width": 256, "height": 256}


def submit(api: ServerProcess, body: dict) -> str:
    """POST a native job; on anything but 202, fail with the answer and the replica's log."""
    r = httpx.post(f"{api.url}/api/v1/jobs", json=body, timeout=60)
    assert r.status_code == 202, (r.status_code, r.text, api.log()[-3000:])
    return r.json()["id"]


def sse(url: str, job_id: str, last_event_id: str | None = None, stop_after: str | None = None,
        timeout: float = 120) -> list[tuple[str | None, str, dict]]:
    """(id, event, data) of each Server-Sent Event until the job ends (or `stop_after` an event type)."""
    events: list[tuple[str | None, str, dict]] = []
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with httpx.stream("GET", f"{url}/api/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as response:
        assert response.status_code == 200
        event_id = name = None
        for line in response.iter_lines():
            if line.startswith("id:"):
                event_id = line.split(":", 1)[1].strip()
            elif line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name:
                events.append((event_id, name, json.loads(line.split(":", 1)[1])))
                if name in ("succeeded", "failed", "canceled") or name == stop_after:
                    return events
                event_id = name = None
    return events


@dataclass
class Cluster:
    a: ServerProcess  # API replicas
    b: ServerProcess
    workers: dict[str, ServerProcess]  # by name: "A", "B"
    shared: Path  # the image store

    def stop(self) -> None:
        for process in (self.a, self.b, *self.workers.values()):
            process.kill()


def start_cluster(models_dir, tmp_path, redis_server, db: int = 0, *api_args: str) -> Cluster:
    """On Redis database `db` (each fixture its own, so clusters never share jobs)."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    shared = tmp_path / "images"
    common = ("--queue", url, "--storage", f"file://{shared}")
    workers = {name: ServerProcess(models_dir, tmp_path / f"w{name}", *common, "--lease-s", "3", "--max-batch", "4",
                                   "--name", name, role="worker").launch() for name in "AB"}
    a = ServerProcess(None, tmp_path / "a", *common, *api_args, role="api").start()
    b = ServerProcess(None, tmp_path / "b", *common, *api_args, role="api").start()
    for worker in workers.values():
        worker.wait_ready()
    return Cluster(a, b, workers, shared)


@pytest.fixture(scope="module")
def cluster(models_dir, tmp_path_factory, redis_server):
    """Shared by the tests that leave every process running."""
    running = start_cluster(models_dir, tmp_path_factory.mktemp("cluster"), redis_server)
    yield running
    running.stop()


@pytest.fixture()
def own_cluster(models_dir, tmp_path, redis_server):
    """For the tests that kill a process."""
    running = start_cluster(models_dir, tmp_path, redis_server, 1)
    yield running
    running.stop()


def test_submit_on_a_watch_on_b_image_from_b(cluster):
    a, b = cluster.a, cluster.b
    job_id = httpx.post(f"{a.url}/api/v1/jobs", json={"prompt": "x", "steps": 8, "n": 2}).json()["id"]
    head = sse(b.url, job_id, stop_after="progress")
    assert head[0][1] in ("queued", "started") and head[-1][1] == "progress"
    rest = sse(b.url, job_id, last_event_id=head[-1][0])  # a reconnect resumes after the last event seen
    steps = [e[2]["step"] for e in head + rest if e[1] == "progress"]
    assert steps == sorted(set(steps)), steps  # no gap and no duplicate across the reconnect
    assert rest[-1][1] == "succeeded"
    job = httpx.get(f"{b.url}/api/v1/jobs/{job_id}").json()
    assert job["worker"] in ("A", "B") and len(job["images"]) == 2
    png = httpx.get(b.url + job["images"][1]["url"])
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_cancel_through_the_other_replica(cluster):
    a, b = cluster.a, cluster.b
    # Two shapes, so they cannot share a batch: each worker is busy with one.
    running = [httpx.post(f"{a.url}/api/v1/jobs", json={**LONG, "steps": 150 - i}).json()["id"] for i in range(2)]
    with a.client() as c:
        for job_id in running:
            wait_for(c, job_id, ("running",), predicate=lambda j: j["step"] >= 1)
    queued = httpx.post(f"{a.url}/api/v1/jobs", json={"prompt": "q", "steps": 2}).json()["id"]
    assert httpx.delete(f"{b.url}/api/v1/jobs/{queued}").json()["status"] == "canceled"
    for job_id in running:
        httpx.delete(f"{b.url}/api/v1/jobs/{job_id}")
    with b.client() as c:
        for job_id in running:
            job = wait_for(c, job_id)
            assert job["status"] == "canceled" and job["step"] < 140
        assert wait_for(c, queued)["started_at"] is None  # it never ran


def test_idempotency_keys_hold_across_replicas(cluster):
    a, b = cluster.a, cluster.b
    body = {"prompt": "same", "steps": 2}
    first = httpx.post(f"{a.url}/api/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    again = httpx.post(f"{b.url}/api/v1/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = httpx.post(f"{b.url}/api/v1/jobs", json={**body, "prompt": "other"}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409


def test_a_killed_workers_job_finishes_on_the_other(own_cluster, redis_server):
    a, b, shared = own_cluster.a, own_cluster.b, own_cluster.shared
    # Long enough to be killed mid-run, short enough to run again whole on a busy machine.
    job_id = httpx.post(f"{a.url}/api/v1/jobs", json={**LONG, "n": 2, "steps": 40}).json()["id"]
    with a.client() as c:
        job = wait_for(c, job_id, ("running",), predicate=lambda j: j["step"] >= 1)
    holder = job["worker"]
    survivor = "B" if holder == "A" else "A"
    workers = {w["name"]: w for w in httpx.get(f"{b.url}/api/v1/workers").json()}
    assert set(workers) == {"A", "B"} and job_id in workers[holder]["batch"]
    assert workers["A"]["model"] == "tiny" and workers["A"]["device"] == "cpu" and workers["A"]["last_heartbeat"]
    assert "sdserve_workers 2.0" in httpx.get(f"{b.url}/metrics").text
    own_cluster.workers[holder].kill()  # kill -9 after its first progress event
    with b.client() as c:
        done = wait_for(c, job_id, timeout=600)  # a hang guard: the seconds follow the CPU's speed
    summary = {k: (job[k], done[k]) for k in ("worker", "attempts", "status", "step", "started_at", "finished_at")}
    assert done["status"] == "succeeded" and done["worker"] == survivor, (summary, own_cluster.workers[holder].log()[-3000:])
    # Re-run by the survivor on its second delivery: the lease ran out and recovery handed it over (a job that
    # waited for its timeout instead would have failed). No bound on the seconds: they follow the CPU's speed.
    assert done["attempts"] == 2 and len(done["images"]) == 2
    stored = sorted(p.name for p in shared.rglob(f"{job_id}-*.png"))
    assert stored == [f"{job_id}-0.png", f"{job_id}-1.png"]  # exactly n images, each once
    events = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/1", decode_responses=True)

    def ends() -> list[dict]:
        return [e for _, e in events.xrange(f"sdserve:events:{job_id}")
                if json.loads(e["data"])["type"] in ("succeeded", "failed", "canceled")]

    # The event follows the record's change by one round trip: wait for it, then there is exactly one.
    until(ends, "no terminal event")
    assert len(ends()) == 1
    # The killed worker drops out once its last heartbeat's TTL passes (on a fast machine, after the re-run ends).
    until(lambda: [w["name"] for w in httpx.get(f"{a.url}/api/v1/workers").json()] == [survivor],
          "the killed worker never dropped out of the registry")


def test_a_redis_restart_loses_no_job(cluster, redis_server):
    a, b = cluster.a, cluster.b
    running = httpx.post(f"{a.url}/api/v1/jobs", json={**LONG, "steps": 30}).json()["id"]
    with a.client() as c:
        wait_for(c, running, ("running",), predicate=lambda j: j["step"] >= 1)
    queued = [httpx.post(f"{b.url}/api/v1/jobs", json={"prompt": str(i), "steps": 2}).json()["id"]
              for i in range(4)]
    redis_server.shutdown()  # a clean SHUTDOWN: the append-only file has every write
    time.sleep(1)
    redis_server.start()
    for job_id in (running, *queued):
        with b.client() as c:
            job = wait_for(c, job_id, timeout=120)
        assert job["status"] == "succeeded", job
    for replica in (a, b):  # both ready again: the next tests share this cluster
        replica.wait_ready()


def test_batches_still_form_with_two_workers(cluster):
    a, b = cluster.a, cluster.b
    blockers = [submit(a, {**LONG, "steps": 30 + i}) for i in range(2)]
    with a.client() as c:
        for job_id in blockers:
            wait_for(c, job_id, ("running",))
    same = [submit(b, {"prompt": str(i), "steps": 3, "seed": i}) for i in range(8)]
    for job_id in blockers:
        httpx.delete(f"{a.url}/api/v1/jobs/{job_id}")
    with a.client() as c:
        jobs = [wait_for(c, job_id) for job_id in same]
    assert all(j["status"] == "succeeded" for j in jobs)
    assert max(j["batch_images"] for j in jobs) >= 2  # companions shared a pass


def test_readyz_says_when_redis_is_gone(cluster, redis_server):
    a = cluster.a
    ready = httpx.get(f"{a.url}/readyz")
    assert ready.status_code == 200, (ready.text, a.log()[-3000:])
    redis_server.shutdown()
    try:
        r = httpx.get(f"{a.url}/readyz")
        assert r.status_code == 503 and "Redis" in r.json()["reason"]
        assert httpx.post(f"{a.url}/api/v1/jobs", json={"prompt": "x"}).status_code == 503
    finally:
        redis_server.start()
    until(lambda: httpx.get(f"{a.url}/readyz", timeout=60).status_code == 200, "A never ready after Redis came back")


def test_concurrent_submissions_respect_one_queue_bound(models_dir, tmp_path, redis_server):
    bounded = start_cluster(models_dir, tmp_path, redis_server, 2, "--max-queue", "3")
    a, b = bounded.a, bounded.b
    try:
        # Two shapes, so each worker is busy with one and nothing leaves the queue meanwhile.
        blockers = [httpx.post(f"{a.url}/api/v1/jobs", json={**LONG, "steps": 150 - i}).json()["id"]
                    for i in range(2)]
        with a.client() as c:
            for job_id in blockers:
                wait_for(c, job_id, ("running",))
        codes: list[int] = []
        lock = threading.Lock()

        def post(server):
            r = httpx.post(f"{server.url}/api/v1/jobs", json={"prompt": "x", "steps": 1})
            with lock:
                codes.append(r.status_code)

        threads = [threading.Thread(target=post, args=(s,)) for s in (a, b) * 4]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(codes) == [202] * 3 + [429] * 5  # the bound is the cluster's, not each replica's
        for job_id in blockers:
            httpx.delete(f"{a.url}/api/v1/jobs/{job_id}")
    finally:
        bounded.stop()


def test_a1111_options_are_shared_by_every_replica(cluster):
    a, b = cluster.a, cluster.b
    try:
        assert httpx.post(f"{a.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tinyfile"}).status_code == 200
        assert httpx.get(f"{b.url}/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tinyfile")
        r = httpx.post(f"{b.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=120)
        assert json.loads(r.json()["info"])["sd_model_name"] == "tinyfile"
    finally:
        httpx.post(f"{b.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})
    assert httpx.get(f"{a.url}/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny [")


def test_a1111_interrupt_through_b_stops_only_the_callers_call_made_through_a(cluster):
    """Auth off: the caller is its address. 127.0.0.2 and 127.0.0.3 both call through A; 127.0.0.2
    interrupts through B, and only its own call stops."""
    a, b = cluster.a, cluster.b
    body = {"prompt": "x", "steps": 60, "width": 128, "height": 128, "seed": 1}
    out: dict = {}

    def call(name: str, address: str) -> None:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=120) as c:
            out[name] = c.post(f"{a.url}/sdapi/v1/txt2img", json=body)

    threads = [threading.Thread(target=call, args=(n, addr)) for n, addr in (("mine", "127.0.0.2"),
                                                                           ("theirs", "127.0.0.3"))]
    for t in threads:
        t.start()
    with b.client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as mine:
        until(lambda: mine.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1, "my call never started")
        assert mine.post("/sdapi/v1/interrupt").json() == {}
    for t in threads:
        t.join(120)
    assert out["mine"].json()["images"] == []
    assert len(out["theirs"].json()["images"]) == 1


def test_a_worker_process_joins_and_hands_back_its_batch_on_sigterm(models_dir, tmp_path, redis_server):
    """`sdserve worker`: no public HTTP, a probe port; its jobs appear in the queue's records; on SIGTERM it
    hands its batch back (grace 1 s here) and the job finishes on the other worker."""
    import signal
    import subprocess
    import sys

    from server import free_port

    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    redis.Redis.from_url(url).flushdb()
    storage = f"file://{tmp_path / 'images'}"
    api = ServerProcess(models_dir, tmp_path / "api", "--queue", url, "--storage", storage, "--name", "A").start()
    probe = free_port()
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "sdserve.cli", "worker", "--queue", url, "--storage", storage, "--name", "W",
         "--models-dir", str(models_dir), "--model", "tiny", "--device", "cpu", "--data-dir", str(tmp_path / "w"),
         "--metrics-port", str(probe), "--host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, env={**__import__("os").environ, "SDSERVE_SHUTDOWN_GRACE_S": "1"})
    try:
        def worker_ready() -> bool:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{probe}/readyz", timeout=60).status_code == 200
            except httpx.HTTPError:
                return False

        until(worker_ready, lambda: (tmp_path / "worker.log").read_text(), every=0.2)
        assert "sdserve_workers" in httpx.get(f"http://127.0.0.1:{probe}/metrics").text
        assert {w["name"] for w in httpx.get(f"{api.url}/api/v1/workers").json()} == {"A", "W"}
        # Two shapes, so each worker takes one.
        ids = [httpx.post(f"{api.url}/api/v1/jobs", json={**LONG, "steps": 150 - i}).json()["id"] for i in range(2)]
        with api.client() as c:
            jobs = [wait_for(c, job_id, ("running",), predicate=lambda j: j["step"] >= 1) for job_id in ids]
            on_worker = next(j for j in jobs if j["worker"] == "W")
            other = next(j for j in jobs if j["worker"] == "A")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
            c.delete(f"/api/v1/jobs/{other['id']}")  # free A to take the handed-back job
            done = wait_for(c, on_worker["id"])
        assert done["status"] == "succeeded" and done["worker"] == "A" and done["attempts"] == 1, done
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()
        api.kill()


def test_memory_on_an_api_replica_needs_no_torch(cluster):
    """The api role cannot import torch (tests/no_engine): /sdapi/v1/memory answers with RAM and says where the
    GPUs are, instead of a 500."""
    r = httpx.get(f"{cluster.a.url}/sdapi/v1/memory")
    assert r.status_code == 200 and r.json()["ram"]["total"] > 0 and "workers" in r.json()["cuda"]["error"], r.text


def readyz_reason(server: ServerProcess) -> str:
    try:
        r = httpx.get(server.url + "/readyz", timeout=5)
    except httpx.HTTPError as exc:  # not listening yet
        return f"unreachable: {exc}"
    return "ready" if r.status_code == 200 else r.json()["reason"]


def test_every_role_starts_before_its_stores_and_an_empty_redis_is_restocked(models_dir, tmp_path):
    """api and worker start while neither S3 nor Redis answers: /readyz says which one they wait for, nothing exits,
    and they serve once both are up. A Redis that comes back empty gets the workers' models and the autoscaler's
    stream and group again."""
    from components import RedisServer, SeaweedS3

    redis_server, s3 = RedisServer(tmp_path / "redis"), SeaweedS3(tmp_path / "s3")  # ports chosen, not started
    storage = f"s3://late/images?endpoint_url={s3.endpoint}&region=us-east-1"
    common = ("--queue", redis_server.url, "--storage", storage)
    worker = ServerProcess(models_dir, tmp_path / "w", *common, "--lease-s", "3", "--name", "W", role="worker",
                           env=s3.env).launch()
    api = ServerProcess(None, tmp_path / "a", *common, role="api", env=s3.env).launch()
    try:
        for p in (api, worker):
            until(lambda: "the image store" in readyz_reason(p), "waiting for S3", 60, api, worker)
        s3.start()
        s3.bucket("late")
        for p in (api, worker):
            until(lambda: "Redis" in readyz_reason(p), "waiting for Redis", 60, api, worker)
        assert httpx.post(f"{api.url}/api/v1/jobs", json={"prompt": "x"}).status_code == 503
        redis_server.start()
        for p in (api, worker):
            until(lambda: readyz_reason(p) == "ready", "ready", 60, api, worker)
        job = httpx.post(f"{api.url}/api/v1/jobs", json={"prompt": "x", "steps": 2}).json()
        with api.client() as c:
            assert wait_for(c, job["id"])["status"] == "succeeded"
        assert "Traceback" not in worker.log() + api.log()

        client = redis_server.client()
        client.flushall()  # as a Redis restarted without its data
        until(lambda: "tiny" in client.hgetall("sdserve:shared:models"), "models published again", 30, api, worker)
        until(lambda: client.exists("sdserve:demand") and any(
            g["name"] == "workers" for g in client.xinfo_groups("sdserve:demand")), "autoscaler stream", 30, api, worker)
        until(lambda: [w["name"] for w in httpx.get(f"{api.url}/api/v1/workers").json()] == ["W"],
              "worker registered again", 30, api, worker)
        job = httpx.post(f"{api.url}/api/v1/jobs", json={"prompt": "y", "steps": 2}).json()
        with api.client() as c:
            assert wait_for(c, job["id"])["status"] == "succeeded"
    finally:
        for p in (api, worker):
            p.kill()
        redis_server.stop()
        s3.stop()


def test_a_webhook_arrives_signed_after_a_kill_9_of_the_replica_that_accepted_the_job(cluster, redis_server,
                                                                                     tmp_path):
    """The outbox is Redis's, not the accepting replica's memory: the job's worker queues the delivery with the
    job's end, and a surviving replica sends it. (The module's replicas a and b have no signing secret: they send
    no webhooks, and leave the delivery to a replica that can sign it.)"""
    from components import WebhookReceiver
    from standardwebhooks.webhooks import Webhook

    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    common = ("--queue", redis_server.url.rsplit("/", 1)[0] + "/0", "--storage", f"file://{cluster.shared}",
              "--webhook-secret", secret, "--webhook-allow-hosts", "localhost")
    accepting = ServerProcess(None, tmp_path / "x", *common, role="api").start()
    surviving = ServerProcess(None, tmp_path / "y", *common, role="api").start()
    receiver = WebhookReceiver()
    try:
        job_id = submit(accepting, {**LONG, "steps": 20, "webhook_url": receiver.url,
                                    "webhook_events": ["completed"]})
        with surviving.client() as c:
            wait_for(c, job_id, ("running",))
            accepting.kill()  # kill -9 while its job runs
            done = wait_for(c, job_id, timeout=600)
            assert done["status"] == "succeeded"
            [(headers, body)] = receiver.wait_for(1)
            message = Webhook(secret).verify(body, headers)
            assert message["type"] == "job.completed" and message["data"]["id"] == job_id
            assert headers["webhook-id"] == f"msg_{job_id}_completed"
            delivered = until(lambda: [a for a in c.get(f"/api/v1/jobs/{job_id}/webhooks").json()["attempts"]
                                       if a["delivered"]] or None, "the delivery was never logged")
            assert len(delivered) == 1  # once: at least once, and here exactly once
    finally:
        accepting.kill()
        surviving.kill()
        receiver.stop()
