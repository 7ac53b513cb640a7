"""The image store contract, run against every backend (a local folder; S3 on a real SeaweedFS server), and
the server with its images in S3: presigned URLs for the native route, OpenAI and SageMaker."""

from __future__ import annotations

import base64
import io
import time
import uuid

import httpx
import pytest
from PIL import Image
from server import ServerProcess, wait_for

from sdserve.storage import StoreError, open_store


@pytest.fixture(scope="module")
def s3(seaweed_s3):
    return seaweed_s3


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path, monkeypatch):
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'images'}", tmp_path)
    s3 = request.getfixturevalue("s3")
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    bucket = s3.bucket("contract")
    prefix = f"case-{uuid.uuid4().hex[:8]}/images"
    return open_store(f"s3://{bucket}/{prefix}?endpoint_url={s3.endpoint}&region=us-east-1", tmp_path)


# ---------------------------------------------------------------- the contract, on every backend
def test_put_and_get(store):
    key = store.put(b"\x89PNG one")
    assert len(key) == 32 and store.get(key) == b"\x89PNG one"
    assert store.get(uuid.uuid4().hex) is None


def test_a_keyed_put_stores_once_first_writer_wins(store):
    key = f"{uuid.uuid4().hex}-0"
    assert store.put(b"first", key=key) == key
    assert store.put(b"second", key=key) == key  # a second worker racing on the same job
    assert store.get(key) == b"first"


def test_keys_are_the_servers_never_a_path(store):
    for bad in ("../../etc/passwd", "x", "0" * 31, "0" * 32 + "/x", ""):
        assert store.get(bad) is None
    with pytest.raises(ValueError):
        store.put(b"x", key="../evil")


def test_probe_passes_on_a_working_store(store):
    store.probe()


def test_prune_deletes_what_was_stored_before_a_time(store):
    keys = [store.put(b"old"), store.put(b"older", key=f"{uuid.uuid4().hex}-0")]
    assert store.prune(time.time() - 3600) == 0  # nothing is an hour old
    assert all(store.get(k) for k in keys)
    time.sleep(1.1)  # S3 keeps LastModified to the second
    assert store.prune(time.time()) == 2
    assert [store.get(k) for k in keys] == [None, None]
    assert store.prune(time.time()) == 0


def test_urls(store):
    key = store.put(b"pixels")
    url = store.url(key, 60)
    if store.uri(key) is None:  # a local folder: the API serves the bytes itself
        assert url is None
        return
    assert store.uri(key).startswith("s3://") and store.uri(key).endswith(f"{key}.png")
    assert httpx.get(url).content == b"pixels"
    unsigned = url.split("?")[0]
    assert httpx.get(unsigned).status_code == 403  # anonymous reads of the bucket are never needed
    short = store.url(key, 1)
    time.sleep(2.5)
    assert httpx.get(short).status_code == 403  # expired


def test_s3_unreachable_is_a_store_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    dead = open_store("s3://b?endpoint_url=http://127.0.0.1:9&region=us-east-1", tmp_path)
    with pytest.raises(StoreError):
        dead.probe()
    with pytest.raises(StoreError):
        dead.put(b"x")


@pytest.mark.parametrize("url", ["ftp://x", "s3://", "s3://b?endpoint=x"])
def test_bad_storage_urls_are_refused(tmp_path, url):
    with pytest.raises(ValueError):
        open_store(url, tmp_path)


# ---------------------------------------------------------------- the server with images in S3
@pytest.fixture(scope="module")
def s3_server(models_dir, module_servers, s3):
    bucket = s3.bucket("images")
    storage = f"s3://{bucket}/out?endpoint_url={s3.endpoint}&region=us-east-1"
    return module_servers(models_dir, "s3server", "--storage", storage,
                          env={**s3.env, "SDSERVE_IMAGE_URL_TTL_S": "30"})


def _keys(s3, bucket="images"):
    return {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_job_images_go_to_s3_and_the_native_route_redirects(s3_server, s3):
    with s3_server.client() as c:
        job = wait_for(c, c.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "n": 2}).json()["id"])
        assert job["status"] == "succeeded"
        assert {f"out/{r['id']}.png" for r in job["images"]} <= _keys(s3)
        r = c.get(job["images"][0]["url"], follow_redirects=False)
        assert r.status_code == 307 and "X-Amz-Signature" in r.headers["location"]
        png = httpx.get(r.headers["location"]).content  # no credentials: the presigned URL is enough
        assert Image.open(io.BytesIO(png)).size == (64, 64)
        assert png == s3.client().get_object(Bucket="images", Key=f"out/{job['images'][0]['id']}.png")["Body"].read()
        # The synchronous route reads the bytes back from S3.
        sync = c.post("/api/v1/generate", json={"prompt": "y", "steps": 2})
        assert sync.status_code == 200 and sync.content[:4] == b"\x89PNG"


def test_input_images_go_to_s3(s3_server, s3):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
    with s3_server.client() as c:
        job = wait_for(c, c.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "strength": 0.5,
                                                        "init_image": base64.b64encode(buf.getvalue()).decode()}
                                 ).json()["id"])
    assert job["status"] == "succeeded"
    assert f"out/{job['request']['init_image']}.png" in _keys(s3)


def test_openai_url_and_sagemaker_locations_are_presigned(s3_server):
    with s3_server.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "response_format": "url"})
        url = r.json()["data"][0]["url"]
        assert "X-Amz-Signature" in url and httpx.get(url).content[:4] == b"\x89PNG"
        r = c.post("/invocations", json={"prompt": "x", "steps": 2})
        located = r.json()["s3"]
        assert located[0]["uri"].startswith("s3://images/out/")
        assert httpx.get(located[0]["url"]).content == base64.b64decode(r.json()["images"][0])
        # An A1111-shaped invocation (the shape SageMaker A1111 deployments send) gets them too, one per image.
        r = c.post("/invocations", json={"prompt": "x", "steps": 2, "batch_size": 2, "sampler_name": "Euler"})
        images, located = r.json()["images"], r.json()["s3"]
        assert len(located) == 2 and [httpx.get(x["url"]).content for x in located] == [base64.b64decode(i) for i in images]


def test_proxy_mode_serves_the_bytes(models_dir, tmp_path, s3):
    bucket = s3.bucket("proxied")
    storage = f"s3://{bucket}?endpoint_url={s3.endpoint}&region=us-east-1"
    proc = ServerProcess(models_dir, tmp_path, "--storage", storage,
                         env={**s3.env, "SDSERVE_IMAGE_ROUTE": "proxy"}).start()
    try:
        with proc.client() as c:
            job = wait_for(c, c.post("/api/v1/jobs", json={"prompt": "x", "steps": 2}).json()["id"])
            r = c.get(job["images"][0]["url"], follow_redirects=False)
            assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    finally:
        proc.terminate()
