"""Hires fix: one job of two passes (the latent or the pixels upscaled, then img2img at the larger size), with
progress across both and A1111's infotext, natively and through webuiapi unmodified."""

from __future__ import annotations

import numpy as np
import pytest
import webuiapi
from PIL import Image

from sdserve import core
from sdserve.engine import infotext
from sdserve.schema import GenerationRequest, Hires


def run(engine, on_step=None, **fields):
    (queued,), _ = core.inline_inputs([GenerationRequest(prompt="a red circle", seed=6, steps=4, **fields)])
    return engine.run([queued], on_step=on_step)[0]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_makes_the_larger_picture_in_two_passes(engine, upscaler):
    steps: list[tuple[int, int]] = []
    (image,) = run(engine, on_step=lambda s, t: steps.append((s, t)),
                   hires={"scale": 2, "upscaler": upscaler, "steps": 6, "strength": 0.5})
    assert image.image.size == (128, 128)
    assert steps == [(i, 4 + 3) for i in range(1, 8)]  # 4 first-pass steps, then int(6 * 0.5) of the second
    params = infotext.parse(image.infotext)
    assert (params["Size-1"], params["Size-2"]) == ("64", "64")
    assert params["Hires upscale"] == "2" and params["Hires upscaler"] == upscaler
    assert params["Hires steps"] == "6" and params["Denoising strength"] == "0.5"


def test_the_second_pass_repaints_the_upscaled_picture(engine):
    (base,) = run(engine)
    (hires,) = run(engine, hires={"upscaler": "Lanczos", "strength": 0.6})
    plain = np.asarray(base.image.resize((128, 128), Image.LANCZOS), dtype=np.int16)
    assert np.abs(np.asarray(hires.image, dtype=np.int16) - plain).max() > 10


def test_target_size_rules():
    assert Hires(scale=1.5).target(512, 768) == (768, 1152)
    assert Hires(width=100).target(64, 48) == (96, 72)  # the other side kept in proportion, multiples of 8
    assert Hires(width=128, height=96).target(64, 64) == (128, 96)


def test_hires_prompt_changes_only_the_second_pass(engine):
    (same,) = run(engine, hires={"strength": 0.6})
    (again,) = run(engine, hires={"strength": 0.6, "prompt": "a red circle"})
    (other,) = run(engine, hires={"strength": 0.6, "prompt": "a blue square"})
    assert np.array_equal(same.pixels, again.pixels)  # an empty hires prompt is the first pass's
    assert np.abs(same.pixels - other.pixels).max() > 1e-5  # (the tiny random model barely reads prompts)
    assert "Hires prompt: a blue square" in other.infotext


def test_webuiapi_enable_hr(server_for_hires):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server_for_hires.port, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, enable_hr=True, hr_scale=2,
                         hr_upscaler="Latent", denoising_strength=0.6, hr_second_pass_steps=4)
    assert result.image.size == (128, 128)
    assert "enable_hr" not in result.info["ignored_fields"]
    assert "Hires upscale: 2," in result.info["infotexts"][0] and "Size: 64x64" in result.info["infotexts"][0]
    with server_for_hires.client() as c:
        modes = [m["name"] for m in c.get("/sdapi/v1/latent-upscale-modes").json()]
        assert "Latent (nearest-exact)" in modes
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True,
                                              "hr_upscaler": "R-ESRGAN 4x+"})
        assert r.status_code == 422 and "R-ESRGAN 4x+" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"prompt": "x", "width": 1024, "height": 1024, "hires": {"scale": 4}})
        assert r.status_code == 422 and "over this server's limit" in r.text


@pytest.fixture(scope="module")
def server_for_hires(models_dir, module_servers):
    return module_servers(models_dir, "hires")


def test_max_steps_bounds_the_hires_pass_too(models_dir, tmp_path):
    from sdserve.config import Settings
    from sdserve.core import RequestRejected
    from sdserve.service import Service

    service = Service(Settings(data_dir=tmp_path, models_dir=models_dir, models=["tiny"], device="cpu", max_steps=10),
                      "worker")
    service.validate(GenerationRequest(prompt="x", steps=10, hires=Hires(scale=2, steps=10)))
    with pytest.raises(RequestRejected, match="hires steps 20 is over this server's limit of 10") as raised:
        service.validate(GenerationRequest(prompt="x", steps=10, hires=Hires(scale=2, steps=20)))
    assert raised.value.field == "hires.steps"
