"""Upscalers as A1111 has them: its resamplers and ESRGAN-family models read by spandrel (a tiny ESRGAN built
from spandrel's own class, saved, and loaded back by file), in extras jobs on the worker and in hires fix; the
pickle rule; and the A1111 endpoints through webuiapi."""

from __future__ import annotations

import base64
import io
import sys

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image
from safetensors.torch import save_file
from tolerance import LEVELS

from sdserve.engine.upscale import UpscaleError, Upscalers, import_spandrel, run_tiled
from sdserve.schema import Extras, GenerationRequest
from sdserve.upscalers import PickleRefusedError, UnknownUpscalerError, UpscalerCatalog


def spandrel_or_skip():
    """spandrel, or skip: it needs a torchvision built for this torch, which PyPI does not have for CPU torch
    (src/sdserve/engine/upscale.py)."""
    try:
        return import_spandrel()
    except UpscaleError as exc:
        pytest.skip(str(exc))


def save_upscalers(models_dir):
    """models/ESRGAN/tiny-2x.safetensors and the same weights as a pickle, tiny-pickle-2x.pth: a tiny ESRGAN
    made with spandrel's own class where spandrel is installed, else tensors of the same names (enough for the
    catalog and the checks made before a job runs)."""
    folder = models_dir / "ESRGAN"
    folder.mkdir(exist_ok=True)
    try:
        import_spandrel()
        from spandrel.architectures.ESRGAN import ESRGAN

        torch.manual_seed(2)
        weights = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2).state_dict()
    except UpscaleError:
        weights = {"model.0.weight": torch.zeros(8, 3, 3, 3)}
    weights = {k: v.contiguous() for k, v in weights.items()}
    save_file(weights, folder / "tiny-2x.safetensors")
    torch.save(weights, folder / "tiny-pickle-2x.pth")
    return folder


def noise(width=40, height=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def px(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory):
    models = tmp_path_factory.mktemp("upscale-models")
    save_upscalers(models)
    return Upscalers(UpscalerCatalog(models), "cpu")


# ---------------------------------------------------------------- A1111's rules, on the engine side
def test_a_model_is_read_back_by_file_and_runs_at_its_scale(upscalers):
    spandrel_or_skip()
    model = upscalers.model("tiny-2x")
    assert model.architecture.name == "ESRGAN" and model.scale == 2
    image = noise()
    out = upscalers.upscale(image, "tiny-2x", 2)
    assert out.size == (80, 64)
    with torch.inference_mode():
        whole = model(torch.from_numpy(px(image).astype(np.float32) / 255).permute(2, 0, 1)[None])
    expected = (whole[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round()
    assert np.abs(px(out) - expected).max() <= LEVELS  # in one tile: the model's own output


def test_tiles_blend_into_the_whole_picture(upscalers):
    spandrel_or_skip()
    model, image = upscalers.model("tiny-2x"), noise(100, 70)
    whole, tiled = px(run_tiled(model, image, tile=1000)), px(run_tiled(model, image, tile=40, overlap=8))
    # a tile's border pixels see zero padding instead of their neighbours; the overlap ramps hide most of it
    assert np.abs(whole - tiled).mean() < 1.0 and np.abs(whole - tiled).max() < 64


def test_a_model_upscales_until_the_target_then_lands_on_it(upscalers):
    spandrel_or_skip()
    image = noise(40, 32)
    assert upscalers.upscale(image, "tiny-2x", 4).size == (160, 128)  # the x2 model twice
    assert upscalers.upscale(image, "tiny-2x", 3).size == (120, 96)  # twice, then Lanczos down to the target
    out, info = upscalers.extras(image, Extras(scale=2, upscaler="tiny-2x"))
    assert out.size == (80, 64) and info == {"Postprocess upscale by": 2.0, "Postprocess upscaler": "tiny-2x"}
    assert upscalers.resize(image, "tiny-2x", (64, 48)).size == (64, 48)  # hires fix's: up, then to the size
    checks = []
    upscalers.upscale(noise(400, 200), "tiny-2x", 2, check=lambda: checks.append(1))
    assert len(checks) == 6  # before each of its 192 px tiles (3 x 2): where a cancel stops it


def test_a_model_file_that_is_not_an_upscaler_is_a_clear_error(tmp_path):
    spandrel_or_skip()
    (tmp_path / "ESRGAN").mkdir()
    save_file({"weight": torch.zeros(3)}, tmp_path / "ESRGAN" / "junk.safetensors")
    (tmp_path / "ESRGAN" / "broken.safetensors").write_bytes(b"not a file")
    upscalers = Upscalers(UpscalerCatalog(tmp_path), "cpu")
    for name in ("junk", "broken"):
        with pytest.raises(UpscaleError, match=f"upscaler '{name}'"):
            upscalers.prepare(name)
    upscalers.prepare("Lanczos")  # built in: nothing to load


def test_a_pickle_loads_only_when_allowed(tmp_path):
    spandrel_or_skip()
    save_upscalers(tmp_path)
    with pytest.raises(UpscaleError, match="--allow-pickle"):
        Upscalers(UpscalerCatalog(tmp_path), "cpu").model("tiny-pickle-2x")
    allowed = Upscalers(UpscalerCatalog(tmp_path, allow_pickle=True), "cpu")
    assert allowed.model("tiny-pickle-2x").scale == 2
    assert allowed.upscale(noise(), "tiny-pickle-2x", 2).size == (80, 64)


def test_resamplers_scale_in_one_pass_onto_the_grid_of_8(upscalers):
    image = noise(40, 32)
    assert upscalers.upscale(image, "Lanczos", 1.5).size == (56, 48)  # floored to multiples of 8
    assert np.array_equal(px(upscalers.upscale(image, "Nearest", 2)), px(image.resize((80, 64), Image.NEAREST)))


def test_extras_by_a_factor_to_a_size_cropped_and_blended(upscalers):
    image = noise(40, 32)
    out, info = upscalers.extras(image, Extras(scale=2, upscaler="Lanczos"))
    assert out.size == (80, 64) and info == {"Postprocess upscale by": 2.0, "Postprocess upscaler": "Lanczos"}
    # to 100x100: by the larger ratio (3.125 -> 120x96 on the grid of 8), centred in 100x100 as A1111 pastes it
    out, info = upscalers.extras(image, Extras(width=100, height=100, upscaler="Lanczos"))
    assert out.size == (100, 100) and info["Postprocess crop to"] == "100x100"
    assert info["Postprocess upscale to"] == "100x100"
    assert px(out)[:2].max() == 0  # 96 rows in 100: A1111's black bands above and below
    first, _ = upscalers.extras(image, Extras(scale=2, upscaler="Lanczos"))
    second, _ = upscalers.extras(image, Extras(scale=2, upscaler="Nearest"))
    blended, info = upscalers.extras(image, Extras(scale=2, upscaler="Lanczos", upscaler_2="Nearest",
                                                   upscaler_2_visibility=0.5))
    assert info["Postprocess upscaler 2"] == "Nearest"
    assert np.abs(px(blended) - (px(first) + px(second)) / 2).max() <= LEVELS
    same, info = upscalers.extras(image, Extras(upscaler="None"))
    assert np.array_equal(px(same), px(image)) and info == {}
    assert Extras(width=100, height=100).output(40, 32) == (100, 100)  # cropped into the size asked for
    assert Extras(width=100, height=100, crop=False).output(40, 32) == (120, 96)  # else all of the upscaled one


def test_names_and_the_pickle_rule(tmp_path):
    save_upscalers(tmp_path)
    catalog = UpscalerCatalog(tmp_path)
    assert [f.name for f in catalog.list()] == ["tiny-2x", "tiny-pickle-2x"]
    assert catalog.get("tiny-2x").scale == 2
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        catalog.get("tiny-pickle-2x")
    with pytest.raises(UnknownUpscalerError, match="unknown upscaler 'R-ESRGAN 4x\\+'.*tiny-2x"):
        catalog.check("R-ESRGAN 4x+")
    catalog.check("Latent (bicubic)", latent=True)
    with pytest.raises(UnknownUpscalerError):
        catalog.check("Latent (bicubic)")  # extras has no latent to upscale
    # safetensors first: a pickle of the same name is never the one loaded
    torch.save({}, tmp_path / "ESRGAN" / "tiny-2x.pth")
    assert catalog.get("tiny-2x").path.suffix == ".safetensors"
    assert UpscalerCatalog(tmp_path, allow_pickle=True).get("tiny-pickle-2x").pickle


def test_an_extras_job_needs_one_init_image_and_both_sides():
    with pytest.raises(ValueError, match="extras upscales one init_image"):
        GenerationRequest(extras=Extras())
    with pytest.raises(ValueError, match="width and height together"):
        Extras(width=100)
    assert GenerationRequest(init_image="x", extras=Extras()).mode == "extras"


# ---------------------------------------------------------------- through the server, with webuiapi
@pytest.fixture(scope="module")
def server(models_dir, module_servers):
    save_upscalers(models_dir)
    return module_servers(models_dir, "upscalers")


@pytest.fixture(scope="module")
def a1111(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3)


def test_webuiapi_extra_single_image_runs_the_model_on_the_worker(a1111, server, models_dir):
    spandrel_or_skip()
    image = noise(64, 48)
    result = a1111.extra_single_image(image, upscaler_1="tiny-2x", upscaling_resize=2)
    assert result.image.size == (128, 96)
    assert result.info == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: tiny-2x</p>"
    expected = Upscalers(UpscalerCatalog(models_dir), "cpu").upscale(image, "tiny-2x", 2)
    assert np.abs(px(result.image) - px(expected)).max() <= LEVELS
    jobs = httpx.get(f"{server.url}/api/v1/jobs").json()  # a queued job like any other, run by a worker
    job = next(j for j in jobs if (j["request"]["extras"] or {}).get("upscaler") == "tiny-2x")
    assert job["status"] == "succeeded" and job["worker"] and job["images"][0]["width"] == 128


def test_webuiapi_extra_batch_images_and_resize_to(a1111):
    result = a1111.extra_batch_images([noise(seed=1), noise(seed=2)], resize_mode=1, upscaling_resize_w=96,
                                      upscaling_resize_h=64, upscaling_crop=True, upscaler_1="Lanczos")
    assert [im.size for im in result.images] == [(96, 64), (96, 64)]
    assert "Postprocess upscale to: 96x64" in result.info and "Postprocess crop to: 96x64" in result.info


def test_upscaler_lists_and_hires_with_a_model(a1111, server):
    names = [u["name"] for u in a1111.get_upscalers()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "tiny-2x" in names
    models = {m["name"]: m for m in httpx.get(f"{server.url}/sdapi/v1/realesrgan-models").json()}
    assert models["tiny-2x"]["scale"] == 2 and models["tiny-2x"]["path"].endswith("tiny-2x.safetensors")
    result = a1111.txt2img(prompt="a red circle", width=64, height=64, seed=3, enable_hr=True, hr_scale=2,
                           hr_upscaler="Nearest", denoising_strength=0.5)
    assert result.image.size == (128, 128) and "Hires upscaler: Nearest" in result.info["infotexts"][0]


def test_hires_fix_with_an_upscaler_model(a1111):
    spandrel_or_skip()

    def draw(upscaler):
        return a1111.txt2img(prompt="a red circle", width=64, height=64, seed=3, steps=3, enable_hr=True,
                             hr_scale=1.5, hr_upscaler=upscaler, denoising_strength=0.3)

    result, resampled = draw("tiny-2x"), draw("Lanczos")
    assert result.image.size == (96, 96) and "Hires upscaler: tiny-2x" in result.info["infotexts"][0]
    assert np.abs(px(result.image) - px(resampled.image)).max() > LEVELS  # the model's picture, not a resample


def test_an_upscaled_png_keeps_its_infotext_and_adds_a1111s_postprocessing(a1111):
    made = a1111.txt2img(prompt="keep me", width=64, height=64, seed=4, steps=2).image
    upscaled = a1111.extra_single_image(made, upscaler_1="Lanczos", upscaling_resize=1.5).image
    info = a1111.png_info(upscaled)
    assert info.json["parameters"]["Prompt"] == "keep me" and info.json["parameters"]["Seed"] == "4"
    assert info.json["items"]["postprocessing"] == "Postprocess upscale by: 1.5, Postprocess upscaler: Lanczos"


def test_bad_extras_are_4xx_naming_the_field(server):
    url, image = f"{server.url}/sdapi/v1/extra-single-image", base64.b64encode(_png(noise())).decode()
    r = httpx.post(url, json={"image": image, "upscaler_1": "tiny-pickle-2x"}, timeout=60)
    assert r.status_code == 422 and "--allow-pickle" in r.text
    r = httpx.post(url, json={"image": image, "upscaler_1": "4x-UltraSharp"}, timeout=60)
    assert r.status_code == 422 and "unknown upscaler '4x-UltraSharp'" in r.text
    r = httpx.post(url, json={"image": image, "upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, timeout=60)
    assert r.status_code == 422 and "gfpgan_visibility" in r.text
    r = httpx.post(url, json={"upscaler_1": "Lanczos"}, timeout=60)
    assert r.status_code == 422 and "image" in r.text
    big = base64.b64encode(_png(noise(300, 300))).decode()
    r = httpx.post(url, json={"image": big, "upscaler_1": "Lanczos", "upscaling_resize": 8}, timeout=60)
    assert r.status_code == 422 and "2400x2400" in r.text and "limit of 2048" in r.text
    r = httpx.post(f"{server.url}/api/v1/jobs", json={"init_image": image, "extras": {"width": 100}}, timeout=60)
    assert r.status_code == 422 and "width and height together" in r.text
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "width": 64, "height": 64, "steps": 3,
                                                            "hr_upscaler": "R-ESRGAN 4x+"}, timeout=60)
    assert r.status_code == 422 and "unknown upscaler" in r.text


def _png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_without_spandrel_a_model_is_the_operators_problem(monkeypatch, tmp_path):
    """Where spandrel is not installed, naming a model is a 503-class error (the catalog accepted the file; the
    server cannot read it), not the client's fault; the resamplers still work."""
    from sdserve.catalog import ModelError
    from sdserve.engine.upscale import UpscalersUnavailable

    save_upscalers(tmp_path)
    monkeypatch.setitem(sys.modules, "spandrel", None)  # what `import spandrel` meets when it is not installed
    upscalers = Upscalers(UpscalerCatalog(tmp_path), "cpu")
    with pytest.raises(UpscalersUnavailable, match="need spandrel") as err:
        upscalers.prepare("tiny-2x")
    assert isinstance(err.value, ModelError)  # the runner fails such jobs as "unavailable"
    assert upscalers.upscale(noise(), "Lanczos", 2).size == (80, 64)
