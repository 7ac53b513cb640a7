"""A model file that cannot load is a clear, lasting state: the model is `failed` with its file and the reason
(in /readyz, /api/v1/models and the log); generation on it answers 503 (the default) or 404 (named), in each
dialect's error shape; nothing answers 500, and the other models keep working."""

from __future__ import annotations

import struct

import httpx
import pytest
from server import ServerProcess, until, wait_for


def broken_safetensors(path):
    """A valid 8-byte header length followed by a header that is not JSON."""
    body = b"{}garbage"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


@pytest.fixture(scope="module")
def broken_default(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken-model")
    broken = broken_safetensors(root / "broken.safetensors")
    server = ServerProcess(None, root / "data", "--models-dir", str(models_dir), "--model", str(broken),
                           "--model", "tiny").launch()
    def says_why() -> bool:  # not ready, ever: wait until it says why
        try:
            ready = httpx.get(server.url + "/readyz", timeout=60)
        except httpx.HTTPError:
            return False
        return ready.status_code == 503 and "failed to load" in ready.json()["reason"]

    until(says_why, server.log, 300, server, every=0.1)
    yield server
    server.kill()


def test_readyz_and_models_name_the_file_and_why(broken_default):
    reason = httpx.get(broken_default.url + "/readyz").json()["reason"]
    assert "broken.safetensors" in reason and "not a safetensors file" in reason, reason
    models = {m["name"]: m for m in httpx.get(broken_default.url + "/api/v1/models").json()}
    assert models["broken"]["status"] == "failed" and "broken.safetensors" in models["broken"]["error"]
    assert models["tiny"]["status"] in ("available", "loaded") and models["tiny"]["error"] is None
    assert "broken.safetensors" in broken_default.log() and "Traceback" not in broken_default.log()


def test_generation_on_the_failed_default_is_503_in_every_dialect(broken_default):
    with broken_default.client() as c:
        r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 1})
        assert r.status_code == 503 and "broken.safetensors" in r.json()["detail"] and r.headers["Retry-After"]
        assert c.get("/", params={"prompt": "x"}).status_code == 503
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1})
        assert r.status_code == 503 and set(r.json()) == {"error", "detail", "body", "errors"}, r.text
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["message"], r.text


def test_a_named_failed_model_is_404_and_the_others_keep_working(broken_default):
    with broken_default.client() as c:
        r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, "model": "broken"})
        assert r.status_code == 404 and "broken.safetensors" in r.json()["detail"], r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1,
                                              "override_settings": {"sd_model_checkpoint": "broken"}})
        assert r.status_code == 404 and r.json()["error"], r.text
        job = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "model": "tiny"}).json()
        assert wait_for(c, job["id"])["status"] == "succeeded"
