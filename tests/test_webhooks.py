"""Webhooks and deadlines: where a delivery may go, the outbox on every backend, and signed deliveries from a real
server to a real receiver, verified with the `standardwebhooks` package. (The kill -9 of the API replica that
accepted a job is in test_cluster.py: it needs Redis and two replicas.)"""

from __future__ import annotations

import json
import time

import pytest
from components import WebhookReceiver
from server import until, wait_for
from standardwebhooks.webhooks import Webhook

from sdserve import webhooks
from sdserve.api.deps import _duration
from sdserve.jobs import policy
from sdserve.schema import JobRequest

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


# ----- rules ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("address, ok", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False),
    ("192.168.0.10", False), ("172.16.5.4", False), ("169.254.169.254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("::1", False), ("fe80::1", False), ("fd00::1", False), ("::ffff:127.0.0.1", False),
    ("224.0.0.1", False), ("64:ff9b::a00:1", False), ("64:ff9b:1::a00:1", False), ("2002:a00:1::", False),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False), ("::10.0.0.1", False),  # IPv4 inside IPv6: NAT64, 6to4, ...
])
def test_only_public_addresses_are_delivered_to(address, ok):
    assert webhooks.public(address) is ok


def test_addresses_and_names_at_submission_and_at_delivery():
    assert "not a public address" in webhooks.literal_blocked("http://169.254.169.254/latest", [])
    assert "this machine" in webhooks.literal_blocked("http://localhost:8080/x", [])
    assert webhooks.literal_blocked("http://localhost:8080/x", ["LOCALHOST"]) is None  # allowed by name
    assert webhooks.literal_blocked("https://hooks.example.org/x", []) is None  # a name: checked when resolved
    with pytest.raises(webhooks.Blocked, match="not a public address"):
        webhooks.resolve("localhost", 80, [])  # the check runs on what the name resolves to
    assert webhooks.resolve("localhost", 80, ["localhost"]) in ("127.0.0.1", "::1")
    for bad in ("ftp://x.org/h", "http:///nohost", "https://user:pw@x.org/h", f"http://{'a' * 64}.org/h",
                "http://a..b/h"):
        with pytest.raises(ValueError):
            webhooks.check_url(bad)
    assert webhooks.ascii_host("bücher.example") == "xn--bcher-kva.example"  # what DNS, TLS and Host get
    with pytest.raises(webhooks.Blocked, match="cannot resolve"):
        webhooks.resolve("nothing.invalid", 443, [])


def test_secrets_are_standard_webhooks_secrets():
    assert webhooks.check_secret(SECRET) == SECRET
    for bad in ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_c2hvcnQ="):
        with pytest.raises(ValueError):
            webhooks.check_secret(bad)


def test_cancel_after_and_deadlines():
    assert [_duration(t) for t in ("90", "30s", "5m", "1h30m", "2.5s", "", "5 minutes")] == [
        90, 30, 300, 5400, 2.5, None, None]
    assert policy.deadline(100.0, 600, 30) == 130 and policy.deadline(100.0, None, None) is None
    assert policy.past_deadline(30, 100.0, 130.0, "queued")[0] == "canceled"
    assert policy.past_deadline(30, 100.0, 160.0, "running")[:3:2] == ("failed", "timeout")


# ----- the outbox, every backend ---------------------------------------------------------------------------------
def test_the_outbox_holds_each_due_delivery_until_it_is_done(make_queue):
    queue, other = make_queue(), make_queue()  # two processes: a worker's and an API replica's
    spec = {"webhook_url": "https://hooks.example.org/h", "webhook_events": ["queued", "progress", "completed"]}
    job = queue.submit(JobRequest(prompt="x", steps=10, **spec))[0]
    plain = queue.submit(JobRequest(prompt="y", steps=10))[0]
    [queued] = other.claim_webhooks(10, 30)
    assert (queued.job_id, queued.event, queued.attempts) == (job.id, "queued", 1)
    assert other.claim_webhooks(10, 30) == []  # leased: nobody else sends it meanwhile
    other.webhook_attempted(queued, {"id": queued.message_id, "status_code": 500}, retry_at=time.time() - 1)
    [again] = other.claim_webhooks(10, 30)
    assert again.attempts == 2 and again.message_id == queued.message_id  # a retry is the same message
    other.webhook_attempted(again, {"id": again.message_id, "status_code": 204}, retry_at=None)
    assert other.claim_webhooks(10, 30) == []  # delivered: gone from the outbox

    claimed = queue.claim(wait_s=0, select=lambda jobs: jobs[:2])
    for step in (1, 2, 3):  # progress is coalesced: one pending delivery, with the latest step
        queue.progress([job.id, plain.id], step, 10, claimed[0].batch_id)
    assert other.claim_webhooks(10, 30) == []  # throttled: due PROGRESS_EVERY_S after the first
    queue.succeed(job.id, [])
    queue.succeed(plain.id, [])  # no webhook: nothing queued
    [completed] = other.claim_webhooks(10, 30)
    assert (completed.event, completed.job_id) == ("completed", job.id)
    # the throttle's own clock: the progress delivery comes due PROGRESS_EVERY_S after the first step
    [progress] = until(lambda: other.claim_webhooks(10, 30) or None, "the progress delivery never came due", 30)
    assert (progress.event, progress.step, progress.message_id) == ("progress", 3, f"msg_{job.id}_progress_3")
    other.webhook_release(progress, time.time() - 1)  # a replica that cannot sign it gives it back untried
    [back] = other.claim_webhooks(10, 30)
    assert back.key == progress.key and back.attempts == progress.attempts
    log = other.webhook_log(job.id)
    assert [entry["status_code"] for entry in log] == [500, 204] and other.webhook_log(plain.id) == []


# ----- a real server, a real receiver ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def receiver():
    running = WebhookReceiver()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(models_dir, module_servers):
    return module_servers(models_dir, "webhooks", "--webhook-secret", SECRET, "--webhook-allow-hosts", "localhost")


def verified(delivery: tuple[dict[str, str], bytes]) -> dict:
    headers, body = delivery
    return Webhook(SECRET).verify(body, headers)  # raises unless the signature is the server's


def test_a_job_posts_its_events_signed_and_retries_a_failed_delivery(server, receiver):
    receiver.received.clear()
    receiver.answers[:] = [500]  # the first delivery fails: it is tried again
    with server.client() as client:
        job = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 4, "webhook_url": receiver.url,
                                                 "webhook_events": ["started", "completed"]}).json()
        assert job["request"]["webhook_url"] == receiver.url
        wait_for(client, job["id"])
        deliveries = receiver.wait_for(3)  # started, completed, and one retry
        messages = [verified(d) for d in deliveries]
        ids = [d[0]["webhook-id"] for d in deliveries]
        assert sorted({m["type"] for m in messages}) == ["job.completed", "job.started"]
        assert len(set(ids)) == 2 and len(ids) == 3  # the retry carried the same webhook-id
        completed = next(m for m in messages if m["type"] == "job.completed")
        assert completed["data"]["id"] == job["id"] and completed["data"]["status"] == "succeeded"
        assert completed["data"]["images"][0]["url"].startswith("/api/v1/images/")

        def logged() -> list | None:
            attempts = client.get(f"/api/v1/jobs/{job['id']}/webhooks").json()["attempts"]
            return attempts if len(attempts) >= 3 else None

        attempts = until(logged, "the delivery log never showed the three attempts", 60)  # written after each
        [failed] = [a for a in attempts if a["status_code"] == 500]  # whichever was sent first (they go at once)
        assert failed["next_attempt_at"] is not None and not failed["delivered"]
        assert all(a["delivered"] for a in attempts if a["status_code"] == 200)
        metrics = client.get("/metrics").text
        assert f'sdserve_webhook_deliveries_total{{event="{failed["event"]}",result="retrying"}} 1.0' in metrics
        for event in ("started", "completed"):
            assert f'sdserve_webhook_deliveries_total{{event="{event}",result="delivered"}} 1.0' in metrics


def test_webhooks_are_refused_where_they_could_never_go(server):
    with server.client() as client:
        for url, field in (("http://169.254.169.254/latest/meta-data", "webhook_url"),
                           ("http://10.0.0.5/hook", "webhook_url"), ("gopher://x.org/", "webhook_url")):
            r = client.post("/api/v1/jobs", json={"prompt": "x", "webhook_url": url})
            assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, r.text
        r = client.post("/api/v1/jobs", json={"prompt": "x", "webhook_events": ["completed"]})
        assert r.status_code == 422 and "webhook_url" in r.text


def test_headers_carry_webhooks_cancel_after_and_prefer_wait_in_any_dialect(server, receiver):
    receiver.received.clear()
    receiver.answers[:] = []
    long = {"prompt": "long", "steps": 150, "width": 256, "height": 256}
    with server.client() as client:
        # Cancel-After: the job is no longer wanted after 1 s: it ends canceled (not failed), and says why; the
        # A1111 dialect takes the webhook from headers
        r = client.post("/sdapi/v1/txt2img", json={**long, "prompt": "unwanted"},
                        headers={"Cancel-After": "1s", "Webhook-Url": receiver.url, "Webhook-Events": "canceled"})
        assert r.status_code == 200 and r.json()["images"] == [], r.text  # as A1111 answers an interrupted call
        [delivery] = receiver.wait_for(1)
        message = verified(delivery)
        assert message["type"] == "job.canceled" and "not wanted after 1 s" in message["data"]["error"]
        assert message["data"]["source"] == "a1111"
        # Prefer: wait=1 on a synchronous call: 202 with where the job is, and it goes on
        r = client.post("/api/v1/generate", json=long, headers={"Prefer": "wait=1"})
        assert r.status_code == 202 and r.headers["Preference-Applied"] == "wait=1"
        job_id = r.headers["Location"].rsplit("/", 1)[1]
        assert client.get(f"/api/v1/jobs/{job_id}").json()["status"] in ("queued", "running")
        client.delete(f"/api/v1/jobs/{job_id}")
        # Prefer: wait on a submission: the job as it ended, when it ends in time
        r = client.post("/api/v1/jobs", json={"prompt": "quick", "steps": 2}, headers={"Prefer": "wait=120"})
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        assert client.post("/api/v1/jobs", json={"prompt": "x"}, headers={"Cancel-After": "soon"}).status_code == 400
    assert json.loads(delivery[1])["data"]["id"]
