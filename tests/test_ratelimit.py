"""Rate limits per caller: the token bucket, its shared store (in memory, and a Lua script on real Redis), and
429s with Retry-After and RateLimit headers in each dialect's shape — embedded, and across two API replicas."""

from __future__ import annotations

import httpx
import openai
import pytest
import redis
from server import ServerProcess

from sdserve.ratelimit import Rate, refill


# ---------------------------------------------------------------- the bucket (pure)
def test_rates_parse_with_a_default_burst_of_one_window():
    assert Rate.parse("5/s") == Rate(5.0, 5.0)
    assert Rate.parse("300/min") == Rate(5.0, 300.0)
    assert Rate.parse("1/h", burst=3) == Rate(1 / 3600, 3.0)
    for bad in ("5", "5/fortnight", "0/s", "-1/s"):
        with pytest.raises(ValueError):
            Rate.parse(bad)


def test_bucket_starts_full_drains_and_refills():
    rate = Rate(2.0, 3.0)
    taken, left, _ = refill(None, 0, rate, 1)
    assert taken and left == 2
    taken, left, _ = refill(left, 0, rate, 2)
    assert taken and left == 0
    taken, left, retry = refill(left, 0, rate, 1)
    assert not taken and retry == pytest.approx(0.5)  # one token at 2/s
    taken, left, _ = refill(left, 0.5, rate, 1)
    assert taken and left == pytest.approx(0)
    taken, _, retry = refill(3.0, 0, rate, 8)  # more than the burst never fits; retry = time to fill up
    assert not taken and retry == pytest.approx(0)


@pytest.fixture()
def redis_url(redis_server):
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    return url


def test_the_store_takes_tokens_atomically(make_queue):
    first = make_queue()
    # Redis: two replicas' connections, one bucket
    queues = [first, make_queue() if make_queue.backend == "redis" else first]
    results = [queues[i % 2].take_tokens("ratelimit:test", 0.001, 3, 1) for i in range(5)]
    assert [taken for taken, _, _ in results] == [True, True, True, False, False]
    assert results[2][1] == pytest.approx(0, abs=0.01) and results[3][2] > 900  # ~1000 s for a token at 0.001/s
    assert queues[0].take_tokens("ratelimit:other", 0.001, 3, 2)[0]  # another caller: its own bucket


# ---------------------------------------------------------------- the server, embedded
KEYS = ("alpha", "beta")


@pytest.fixture(scope="module")
def limited(models_dir, module_servers):
    return module_servers(models_dir, "limited", "--api-key", "alpha", "--api-key", "beta",
                          "--rate-limit", "1/min", "--rate-burst", "3", "--images-per-minute", "10")


def client(server, key):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_over_the_limit_is_a_429_with_headers_per_caller(limited):
    with client(limited, "alpha") as alpha, client(limited, "beta") as beta:
        first = alpha.post("/api/v1/jobs", json={"prompt": "a", "steps": 1})
        assert first.status_code == 202
        assert first.headers["RateLimit-Limit"] == "3" and first.headers["RateLimit-Remaining"] == "2"
        assert int(first.headers["RateLimit-Reset"]) > 0
        assert alpha.post("/api/v1/jobs", json={"prompt": "b", "steps": 1}).status_code == 202
        assert alpha.post("/api/v1/jobs", json={"prompt": "c", "steps": 1}).status_code == 202
        over = alpha.post("/api/v1/jobs", json={"prompt": "d", "steps": 1})
        assert over.status_code == 429 and "rate limit" in over.json()["detail"]
        assert over.headers["RateLimit-Remaining"] == "0" and 1 <= int(over.headers["Retry-After"]) <= 60
        # A1111's shape, for the same caller.
        a1111 = alpha.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert a1111.status_code == 429 and a1111.json()["error"] == "HTTPException" and "Retry-After" in a1111.headers
        # Reads are not submissions, probes never limited, and another key has its own budget.
        assert alpha.get("/api/v1/jobs").status_code == 200 and alpha.get("/healthz").status_code == 200
        assert beta.post("/api/v1/jobs", json={"prompt": "e", "steps": 1}).status_code == 202


def test_openai_sdk_sees_its_rate_limit_error(limited):
    sdk = openai.OpenAI(base_url=f"{limited.url}/v1", api_key="beta", max_retries=0)
    for _ in range(2):
        try:
            sdk.images.generate(prompt="x", size="256x256", response_format="b64_json", extra_body={"steps": 1})
        except openai.RateLimitError:
            break
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.images.generate(prompt="x", size="256x256", response_format="b64_json")
    assert caught.value.body["code"] == "rate_limit_exceeded" and caught.value.body["type"] == "rate_limit_error"
    assert caught.value.response.headers["Retry-After"]


def test_images_per_minute_counts_each_image(models_dir, tmp_path):
    proc = ServerProcess(models_dir, tmp_path, "--images-per-minute", "10").start()
    try:
        with proc.client() as c:
            assert c.post("/api/v1/jobs", json={"prompt": "a", "n": 8, "steps": 1}).status_code == 202
            over = c.post("/api/v1/jobs", json={"prompt": "b", "n": 4, "steps": 1})
            assert over.status_code == 429 and "too many images" in over.json()["detail"]
            assert "RateLimit-Limit" in over.headers and over.headers["RateLimit-Limit"] == "10"
            assert c.post("/api/v1/jobs", json={"prompt": "c", "n": 2, "steps": 1}).status_code == 202
            # A1111's n_iter x batch_size is charged as one call: all of it, or nothing queued.
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "batch_size": 2, "n_iter": 2})
            assert r.status_code == 429
            assert len(c.get("/api/v1/jobs").json()) == 2
    finally:
        proc.terminate()


# ---------------------------------------------------------------- two API replicas on Redis
def test_the_limit_holds_across_replicas(redis_url, tmp_path):
    common = ("--queue", redis_url, "--storage", f"file://{tmp_path / 'images'}", "--model", "tiny",
              "--rate-limit", "1/min", "--rate-burst", "4")
    replicas = [ServerProcess(None, tmp_path / name, *common, role="api").start() for name in "ab"]
    try:
        codes = []
        for i in range(6):
            with replicas[i % 2].client() as c:
                codes.append(c.post("/api/v1/jobs", json={"prompt": f"p{i}", "steps": 1}).status_code)
        assert codes == [202, 202, 202, 202, 429, 429]
    finally:
        for replica in replicas:
            replica.terminate()
