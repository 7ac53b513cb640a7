"""Moderation: a prompt blocklist at submission, and a check on every finished image before it is visible —
an HTTP hook started by the test (it reads each PNG's own infotext and blocks the prompts that say
"forbidden"), and diffusers' StableDiffusionSafetyChecker built tiny and loaded from disk. Each dialect's form
of a blocked image: native (the job shows it blocked, no URL serves it; the synchronous routes 400),
A1111 (a black image, `nsfw` in info), OpenAI (content_policy_violation), SageMaker (400 with the code)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import openai
import pytest
from PIL import Image
from server import ServerProcess, free_port, wait_for

from sdserve.moderation import Blocklist, SafetyChecker


# ---------------------------------------------------------------- the blocklist (pure)
def test_blocklist_matches_whole_words_and_phrases_in_any_case():
    blocklist = Blocklist(["gore", "red  herring", "c++"])
    assert blocklist.match("lots of GORE here") == "gore"
    assert blocklist.match("gorey") is None and blocklist.match("") is None
    assert blocklist.match("a Red\therring") == "red\therring"
    assert blocklist.match("learn c++ now") == "c++"
    assert Blocklist().match("anything") is None


# ---------------------------------------------------------------- a hook server, run by the test
class Hook:
    """Blocks an image whose PNG infotext (the prompt it was made from) contains "forbidden"."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.down = False
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                with Image.open(io.BytesIO(body)) as image:
                    prompt = image.text.get("parameters", "")
                hook.seen.append({"job": self.headers["X-Sdserve-Job"], "type": self.headers["Content-Type"],
                                  "prompt": prompt.splitlines()[0] if prompt else ""})
                verdict = {"allow": True} if "forbidden" not in prompt else {"allow": False, "reason": "forbidden"}
                data = json.dumps(verdict).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/check"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.fixture(scope="module")
def moderated(models_dir, tmp_path_factory, module_servers, hook):
    folder = tmp_path_factory.mktemp("moderated")
    blocklist = folder / "blocklist.txt"
    blocklist.write_text("# not on this server\nbanned word\n")
    return module_servers(models_dir, folder / "data", "--moderation", hook.url, "--blocklist", str(blocklist))


GOOD = {"prompt": "a calm lake", "steps": 2, "seed": 1}
BAD = {"prompt": "something forbidden", "steps": 2, "seed": 1}


def test_a_blocked_image_is_withheld_and_recorded(moderated, hook):
    with moderated.client() as c:
        job = wait_for(c, c.post("/api/v1/jobs", json={**BAD, "n": 2}).json()["id"])
        assert job["status"] == "succeeded"
        assert [(i["blocked"], i["reason"], i["url"]) for i in job["images"]] == [(True, "forbidden", None)] * 2
        for image in job["images"]:
            assert c.get(f"/api/v1/images/{image['id']}").status_code == 404  # never stored
        assert any(s["job"] == job["id"] and s["type"] == "image/png" for s in hook.seen)
        ok = wait_for(c, c.post("/api/v1/jobs", json=GOOD).json()["id"])
        assert not ok["images"][0]["blocked"] and c.get(ok["images"][0]["url"]).content[:4] == b"\x89PNG"
        metrics = c.get("/metrics").text
        assert 'sdserve_images_blocked_total{label="anonymous"} 2.0' in metrics


def test_the_synchronous_routes_refuse_a_blocked_image(moderated):
    with moderated.client() as c:
        r = c.post("/api/v1/generate", json=BAD)
        assert r.status_code == 400 and r.json()["code"] == "content_policy_violation"
        assert "forbidden" in r.json()["detail"]
        r = c.get("/", params={"prompt": "forbidden fruit", "steps": 2})
        assert r.status_code == 400 and r.json()["code"] == "content_policy_violation"
        assert c.get("/", params={"prompt": "fruit", "steps": 2}).headers["content-type"] == "image/png"


def test_a1111_gets_a_black_image_and_nsfw_in_info(moderated):
    with moderated.client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "forbidden", "steps": 2, "batch_size": 2, "width": 64,
                                              "height": 64})
        assert r.status_code == 200
        body = r.json()
        info = json.loads(body["info"])
        assert info["nsfw"] == [True, True]
        for b64 in body["images"]:
            with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
                assert image.size == (64, 64) and np.asarray(image).max() == 0
        fine = c.post("/sdapi/v1/txt2img", json={"prompt": "fine", "steps": 2}).json()
        assert json.loads(fine["info"])["nsfw"] == [False]


def test_openai_gets_content_policy_violation(moderated):
    client = openai.OpenAI(base_url=moderated.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="forbidden", size="64x64", response_format="b64_json")
    assert err.value.code == "content_policy_violation"
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="a banned  word", size="64x64")  # the blocklist, at submission
    assert err.value.code == "content_policy_violation" and "banned  word" in err.value.message
    assert client.images.generate(prompt="fine", size="64x64", response_format="b64_json").data[0].b64_json


def test_sagemaker_and_the_blocklist_in_every_dialect(moderated):
    with moderated.client() as c:
        r = c.post("/invocations", json={"prompt": "forbidden", "steps": 2})
        assert r.status_code == 400 and r.json()["code"] == "content_policy_violation"
        for path, body in (("/api/v1/jobs", {"prompt": "Banned Word"}), ("/sdapi/v1/txt2img", {"prompt": "banned word"}),
                           ("/invocations", {"prompt": "banned word"})):
            r = c.post(path, json=body)
            assert r.status_code == 400, (path, r.text)
            assert "banned word" in r.text
        # the negative prompt is where people name what they do not want: never checked
        assert c.post("/api/v1/jobs", json={"prompt": "x", "negative_prompt": "banned word"}).status_code == 202


def test_a_hook_that_cannot_answer_fails_the_job_and_shows_nothing(moderated, hook):
    hook.down = True
    try:
        with moderated.client() as c:
            job = wait_for(c, c.post("/api/v1/jobs", json=GOOD).json()["id"])
            assert job["status"] == "failed" and job["error_kind"] == "unavailable"
            assert "moderation hook" in job["error"] and job["images"] == []
            assert c.post("/api/v1/generate", json=GOOD).status_code == 503
    finally:
        hook.down = False


# ---------------------------------------------------------------- diffusers' safety checker, tiny
def save_safety_checker(folder, threshold: float):
    """A StableDiffusionSafetyChecker with tiny CLIP towers; `threshold` is every concept's: below the cosine
    of any embedding (-2) flags every image, above it (2) none."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor")
    return folder


def test_the_safety_checker_loads_from_disk_and_decides(tmp_path):
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    strict = SafetyChecker(save_safety_checker(tmp_path / "strict", -2.0))
    assert [v.allowed for v in strict.check(images, [b""] * 2, job_id="j", label=None)] == [False, False]
    lenient = SafetyChecker(save_safety_checker(tmp_path / "lenient", 2.0))
    assert [v.allowed for v in lenient.check(images, [b""] * 2, job_id="j", label=None)] == [True, True]
    with pytest.raises(ValueError, match="safety-checker"):
        SafetyChecker(tmp_path)


def test_a_server_with_the_safety_checker(models_dir, tmp_path):
    folder = save_safety_checker(tmp_path / "checker", -2.0)
    proc = ServerProcess(models_dir, tmp_path / "data", "--moderation", "safety-checker",
                         "--safety-checker", str(folder)).start()
    try:
        with proc.client() as c:
            r = c.post("/sdapi/v1/txt2img", json={"prompt": "anything", "steps": 2})
            assert r.status_code == 200 and json.loads(r.json()["info"])["nsfw"] == [True]
            job = wait_for(c, c.post("/api/v1/jobs", json=GOOD).json()["id"])
            assert job["images"][0]["blocked"] and "safety checker" in job["images"][0]["reason"]
    finally:
        proc.terminate()
    missing = ServerProcess(models_dir, tmp_path / "data2", "--moderation", "safety-checker")
    with pytest.raises(RuntimeError, match="--safety-checker"):
        missing.start(timeout=60)
