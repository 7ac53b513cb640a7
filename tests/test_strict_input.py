"""Strict input and bounded work (issue 25): unknown add-on names are refused at submission in every dialect,
seeds are integers, A1111's ranges hold, no error carries a Python repr, a prompt cannot forge the PNG's other
infotext fields, and one request's work is bounded by what the device finishes within the job timeout."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from server import wait_for

FORGED = "a cat\nNegative prompt: evil\nSteps: 99, Sampler: Euler, Model: forged, Seed: 5"


@pytest.fixture(scope="module")
def server(models_dir, module_servers):
    return module_servers(models_dir, "strict")


@pytest.mark.parametrize("field,value", [("vae", "../../../etc/passwd"), ("loras", [{"name": "nope", "weight": 1}]),
                                         ("prompt", "a cat <lora:nope:0.5>"),
                                         ("controlnet", [{"model": "nope", "image": "x"}])])
def test_unknown_add_ons_are_422_at_submission(server, field, value):
    with server.client() as c:
        r = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, field: value})
        assert r.status_code == 422 and "unknown" in r.text, r.text
        assert r.json()["errors"][0]["field"].startswith(field)
        if field == "vae":
            a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1,
                                                       "override_settings": {"sd_vae": value}})
            assert a1111.status_code == 422, a1111.text
        if field == "prompt":  # a LoRA named in the prompt: the same rule in every dialect that takes a prompt
            for path, body in (("/sdapi/v1/txt2img", {"prompt": value, "steps": 1}),
                               ("/v1/images/generations", {"prompt": value}),
                               ("/generate", {"prompt": value, "steps": 1}),
                               ("/invocations", {"prompt": value, "steps": 1})):
                r = c.post(path, json=body)
                assert r.status_code in (400, 422) and "unknown" in r.text and "nope" in r.text, (path, r.text)
            r = c.get("/", params={"prompt": value, "steps": 1})
            assert r.status_code == 422 and "unknown" in r.text and "nope" in r.text, r.text


@pytest.mark.parametrize("body", [{"seed": "12"}, {"seed": True}, {"seed": 1.5}])
def test_a_seed_is_an_integer(server, body):
    with server.client() as c:
        assert c.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, **body}).status_code == 422
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **body}).status_code == 422
        assert c.post("/generate", json={"prompt": "x", "steps": 1, **body}).status_code == 422


def test_a1111_options_refuse_an_unknown_vae_for_everyone(server):
    with server.client() as c:
        r = c.post("/sdapi/v1/options", json={"sd_vae": "nope.safetensors"})
        assert r.status_code == 422 and set(r.json()) == {"error", "detail", "body", "errors"}, r.text
        assert c.get("/sdapi/v1/options").json()["sd_vae"] != "nope.safetensors"


@pytest.mark.parametrize("field,value", [("subseed_strength", 2), ("denoising_strength", 1.5), ("hr_scale", 9),
                                         ("eta", -1)])
def test_a1111_fields_keep_a1111s_ranges(server, field, value):
    with server.client() as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, field: value})
        assert r.status_code == 422 and field in r.text, r.text


def test_no_error_text_carries_a_python_repr(server):
    with server.client() as c:
        for path, body in (("/api/v1/jobs", {"prompt": "x", "init_image": base64.b64encode(b"not an image").decode()}),
                           ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"junk").decode()]}),
                           ("/sdapi/v1/png-info", {"image": base64.b64encode(b"junk").decode()})):
            r = c.post(path, json=body)
            assert 400 <= r.status_code < 500 and " object at 0x" not in r.text, (path, r.text)


def test_a_jobs_error_carries_no_python_repr():
    from datetime import datetime, timezone

    from sdserve.schema import Job, JobRequest

    def failed(error: str) -> Job:
        return Job(id="j", status="failed", request=JobRequest(prompt="x"), created_at=datetime.now(timezone.utc),
                   error=error)

    assert failed("cannot read <_io.BytesIO object at 0x7f3a2c1d0e50>").error == "cannot read the data"
    assert failed("bad <PIL.Image.Image image mode=RGB size=8x8 at 0x7F00AB>").error == "bad the data"
    assert failed("in <function f at 0x7f00ab>: x").error == "in the data: x"


@pytest.mark.parametrize("prompt", [FORGED, "Negative prompt: evil", '"quoted"', " spaced ",
                                    "a cat\u2028Negative prompt: evil", "plain, (emphasis:1.2), a:b"])
def test_every_prompt_reads_back_exactly(prompt):
    from sdserve.engine import infotext

    text = infotext.build(prompt, "neg\nlines", {"Steps": 3, "Sampler": "Euler", "Seed": 1})
    parsed = infotext.parse(text)
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Steps"]) == (prompt, "neg\nlines", "3")


def test_a_prompt_cannot_forge_the_infotext(server):
    with server.client() as c:
        job = c.post("/api/v1/jobs", json={"prompt": FORGED, "negative_prompt": "real", "steps": 2, "seed": 7}).json()
        done = wait_for(c, job["id"])
        png = c.get(done["images"][0]["url"]).content
        info = c.post("/sdapi/v1/png-info", json={"image": base64.b64encode(png).decode()}).json()["parameters"]
    assert info["Prompt"] == FORGED and info["Negative prompt"] == "real"
    assert info["Steps"] == "2" and info["Seed"] == "7" and "forged" not in info.get("Model", "")


def test_one_requests_work_is_bounded_on_this_device(server):
    with server.client() as c:
        r = c.post("/api/v1/jobs", json={"prompt": "x", "n": 8, "width": 2048, "height": 2048, "steps": 150})
        assert r.status_code == 422 and "megapixel-steps" in r.json()["detail"] and "--max-work" in r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 8, "width": 2048, "height": 2048,
                                              "steps": 150})
        assert r.status_code == 422
        r = c.post("/api/v1/jobs", json={"prompt": "x", "width": 1024, "height": 1024, "steps": 20,
                                         "hires": {"scale": 2, "steps": 150, "strength": 1}})
        assert r.status_code == 422  # the hires pass counts too
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "n_iter": 8, "width": 512, "height": 512, "steps": 100})
        assert r.status_code == 422 and "megapixel-steps" in r.text  # the bound is the call's, not each job's


def test_the_operator_sets_the_work_bound(models_dir, servers):
    """--max-work (SDSERVE_MAX_WORK) replaces the device class's default bound, lower or higher."""
    small = {"prompt": "x", "width": 256, "height": 256, "steps": 20}  # 1.31 megapixel-steps
    with servers(models_dir, "tight", "--max-work", "1").client() as c:
        assert c.get("/api/v1/limits").json()["max_work"] == 1
        r = c.post("/api/v1/jobs", json=small)
        assert r.status_code == 422 and "limit of 1 per request" in r.text, r.text
    big = {"prompt": "x", "width": 1024, "height": 1024, "steps": 50}  # 52 megapixel-steps: over the CPU's 40
    with servers(models_dir, "loose", env={"SDSERVE_MAX_WORK": "100"}).client() as c:
        assert c.get("/api/v1/limits").json()["max_work"] == 100
        r = c.post("/api/v1/jobs", json=big)
        assert r.status_code == 202, r.text
        assert c.delete(f"/api/v1/jobs/{r.json()['id']}").status_code == 200


def test_a_cancel_is_noticed_in_the_vae_decode_and_large_decodes_go_in_tiles(engine):
    from sdserve.engine import pipeline
    from sdserve.engine.pipeline import Cancelled
    from sdserve.schema import JobRequest

    def stop() -> None:
        raise Cancelled()

    with pytest.raises(Cancelled):  # every step ran; the decode is where it stops
        engine.run([JobRequest(prompt="x", steps=2, seed=1)], on_decode=stop)
    vae = engine.registry.load(None).pipelines["txt2img"].vae
    calls = []
    size = 1152  # over TILE_ABOVE_PX: 3 x 3 tiles of TILE_PX with their overlap
    latents = torch.zeros(1, 4, size // 8, size // 8)
    with torch.inference_mode(), pipeline._decoding(vae, lambda: calls.append(1), size * size > pipeline.TILE_ABOVE_PX):
        image = vae.decode(latents).sample
    assert image.shape[-2:] == (size, size) and len(calls) > 1 and not np.isnan(image.numpy()).any()
    assert not vae.use_tiling  # for that call only


def test_a_cancel_during_the_vae_decode_ends_the_job_at_the_next_tile(engine, tmp_path):
    """A DELETE that arrives while a large image decodes (tile by tile) ends the job at the next tile: canceled,
    nothing stored, the other tiles never decoded."""
    from sdserve.health import WriteHealth
    from sdserve.jobs.local import SQLiteJobQueue
    from sdserve.jobs.runner import Runner
    from sdserve.schema import JobRequest, JobStatus
    from sdserve.storage.local import LocalImageStore

    queue = SQLiteJobQueue(tmp_path / "jobs.db")
    images = LocalImageStore(tmp_path / "images")
    runner = Runner(engine, queue, images, WriteHealth([]))
    job = queue.submit(JobRequest(prompt="x", steps=1, width=1152, height=1152, seed=1))[0]  # 3 x 3 tiles
    vae = engine.registry.load(None).pipelines["txt2img"].vae
    tiles = []

    def a_delete_arrives(module, args) -> None:  # registered first, so it runs before the runner's own check
        tiles.append(1)
        if len(tiles) == 2:
            queue.cancel(job.id)

    handle = vae.decoder.register_forward_pre_hook(a_delete_arrives)
    try:
        runner._run(queue.claim(wait_s=0))
    finally:
        handle.remove()
        queue.close()
    ended = SQLiteJobQueue(tmp_path / "jobs.db").get(job.id)
    assert ended.status is JobStatus.canceled and ended.images == []
    assert len(tiles) == 2  # the second tile's check stopped it: no tile after
    assert not any((tmp_path / "images").rglob("*.png"))
