"""ControlNet: the preprocessors, a tiny ControlNet made with ControlNetModel.from_unet steering the tiny
engine's pixels, and the sd-webui-controlnet extension's API through webuiapi unmodified."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import tolerance
import webuiapi
from PIL import Image, ImageDraw
from server import wait_for
from tinymodels import save_controlnet, save_diffusers

from sdserve import controlnet, core
from sdserve.engine.models import ModelRegistry
from sdserve.engine.pipeline import Engine, InvalidRequestError
from sdserve.schema import GenerationRequest


def drawing(shape: str = "circle", size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    box = [size * 0.2, size * 0.2, size * 0.8, size * 0.8]
    pen.ellipse(box, fill="black") if shape == "circle" else pen.rectangle([size * 0.1, size * 0.4, size * 0.9, size * 0.6], fill="black")
    return image


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------- preprocessors (pure)
def test_canny_finds_the_outline_and_invert_flips():
    edges = np.asarray(controlnet.detect("canny", drawing(), processor_res=64).convert("L"))
    assert set(np.unique(edges)) == {0, 255}
    assert edges[32, 32] == 0 and edges[:, 10:14].max() == 255  # inside is flat; the left rim is an edge
    inverted = np.asarray(controlnet.detect("invert", drawing(), processor_res=64).convert("L"))
    assert inverted[32, 32] > 250 and inverted[2, 2] < 5
    assert controlnet.detect("canny", drawing(size=32), processor_res=128).size == (128, 128)


@pytest.mark.parametrize("mode", ["Just Resize", "Crop and Resize", "Resize and Fill"])
def test_fit_gives_the_pictures_size(mode):
    wide = Image.new("RGB", (120, 60), "white")
    fitted = controlnet.fit(wide, (64, 64), mode)
    assert fitted.size == (64, 64)
    if mode == "Resize and Fill":  # the wide picture inside, black bars above and below
        assert fitted.getpixel((32, 2)) == (0, 0, 0) and fitted.getpixel((32, 32)) == (255, 255, 255)


def test_extension_model_titles_name_the_same_model():
    assert controlnet.model_name("control_v11p_sd15_canny [d14c016b]") == "control_v11p_sd15_canny"
    assert controlnet.model_name("tiny-canny") == "tiny-canny"


# ---------------------------------------------------------------- on the tiny engine
@pytest.fixture(scope="module")
def cn_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-models")
    pipe = save_diffusers(root / "tiny")
    save_controlnet(pipe, root / "ControlNet" / "tiny-canny", seed=3)
    save_controlnet(pipe, root / "ControlNet" / "tiny-lines", seed=4)
    return root


@pytest.fixture(scope="module")
def cn_engine(cn_models, tmp_path_factory):
    return Engine(ModelRegistry(cn_models, tmp_path_factory.mktemp("cn-data"), extra=["tiny"], device="cpu"))


def unit(shape="circle", **fields):
    return {"image": b64(drawing(shape)), "model": "tiny-canny", "module": "canny", "processor_res": 64, **fields}


def generate(engine, *requests):
    queued, inputs = core.inline_inputs([GenerationRequest(prompt="a red circle", seed=2, steps=4, **r)
                                         for r in requests])
    return [images[0] for images in engine.run(queued, inputs=inputs)]


def diff(a, b) -> float:
    return float(np.abs(a.pixels - b.pixels).max())


def test_weight_zero_equals_no_controlnet_and_the_edge_map_steers(cn_engine):
    plain, zero, circle, bar = generate(cn_engine, {})[0], *(
        generate(cn_engine, {"controlnet": [u]})[0] for u in (unit(weight=0), unit(), unit("bar")))
    # A ControlNet batch runs its UNet on torch (engine/accel.py), the plain one compiled: equal up to float order.
    assert (zero.route.engine, zero.route.fallback, plain.route.fallback) == ("torch", "controlnet", None)
    assert diff(zero, plain) <= tolerance.FLOAT
    assert diff(circle, plain) > 1e-2 and diff(bar, plain) > 1e-2
    assert diff(circle, bar) > 1e-2  # a different edge map, a different picture
    assert diff(generate(cn_engine, {"controlnet": [unit()]})[0], circle) == 0
    assert "ControlNet 0: \"Module: canny, Model: tiny-canny" in circle.infotext


def test_the_step_range_bounds_the_control(cn_engine):
    plain = generate(cn_engine, {})[0]
    never = generate(cn_engine, {"controlnet": [unit(guidance_start=0.0, guidance_end=0.0)]})[0]
    late = generate(cn_engine, {"controlnet": [unit(guidance_start=0.5)]})[0]
    full = generate(cn_engine, {"controlnet": [unit()]})[0]
    assert diff(never, plain) <= tolerance.FLOAT  # torch's UNet (a ControlNet batch) against the compiled one
    assert 0 < diff(late, plain) and diff(late, full) > 1e-3


def test_two_units_and_a_batch_of_different_maps(cn_engine):
    two = generate(cn_engine, {"controlnet": [unit(), unit("bar", model="tiny-lines", module="invert")]})[0]
    assert diff(two, generate(cn_engine, {"controlnet": [unit()]})[0]) > 1e-3
    together = generate(cn_engine, {"controlnet": [unit()]}, {"controlnet": [unit("bar")], "cfg_scale": 4})
    alone = [generate(cn_engine, {"controlnet": [unit()]})[0],
             generate(cn_engine, {"controlnet": [unit("bar")], "cfg_scale": 4})[0]]
    assert all(diff(t, a) <= tolerance.FLOAT for t, a in zip(together, alone))


def test_img2img_with_controlnet(cn_engine):
    init = b64(Image.new("RGB", (64, 64), (200, 40, 40)))
    plain = generate(cn_engine, {"init_image": init, "strength": 0.8})[0]
    steered = generate(cn_engine, {"init_image": init, "strength": 0.8, "controlnet": [unit()]})[0]
    assert diff(steered, plain) > 1e-3


def test_unknown_controlnet_is_the_clients_error(cn_engine):
    with pytest.raises(InvalidRequestError, match="unknown ControlNet 'nope'"):
        generate(cn_engine, {"controlnet": [unit(model="nope")]})


# ---------------------------------------------------------------- the extension's API, webuiapi unmodified
@pytest.fixture(scope="module")
def cn_server(cn_models, module_servers):
    return module_servers(cn_models, "cn-server", "--model", "tiny")


def test_webuiapi_controlnet_units(cn_server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=cn_server.port, sampler="Euler a", steps=3)
    assert api.controlnet_model_list() == ["tiny-canny", "tiny-lines"]
    assert "canny" in api.controlnet_module_list()
    detected = api.controlnet_detect([drawing()], module="canny", processor_res=64, threshold_a=100, threshold_b=200)
    edges = np.asarray(detected.image.convert("L"))
    assert edges.max() == 255 and edges[32, 32] == 0

    def txt2img(units):
        # A fresh alwayson_scripts each call: webuiapi's default is one shared dict that its ControlNet code writes
        # into, so units from one call would ride along on every later call in the process.
        return api.txt2img(prompt="a red circle", seed=9, width=64, height=64, controlnet_units=units,
                           alwayson_scripts={})

    plain = txt2img([])
    steered = txt2img([webuiapi.ControlNetUnit(image=drawing(), module="canny", model="tiny-canny [0123abcd]",
                                               processor_res=64, threshold_a=100, threshold_b=200)])
    zero = txt2img([webuiapi.ControlNetUnit(image=drawing(), module="canny", model="tiny-canny", weight=0)])
    as_array = lambda r: np.asarray(r.image, dtype=np.int16)  # noqa: E731
    assert np.abs(as_array(steered) - as_array(plain)).max() > 2
    assert np.array_equal(as_array(zero), as_array(plain))
    assert not steered.info["ignored_fields"]


def test_native_controlnet_and_errors(cn_server):
    with cn_server.client() as c:
        assert c.get("/api/v1/controlnets").json() == {"models": ["tiny-canny", "tiny-lines"],
                                                       "modules": ["none", "canny", "invert"]}
        job = c.post("/api/v1/jobs", json={"prompt": "x", "steps": 2, "controlnet": [unit()]}).json()
        assert len(job["request"]["controlnet"][0]["image"]) < 100  # an image store key, not the image
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "alwayson_scripts": {"controlnet": {
            "args": [{"image": b64(drawing()), "module": "depth_midas", "model": "tiny-canny"}]}}})
        assert r.status_code == 422 and "depth_midas" in r.json()["detail"]
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "alwayson_scripts": {"ControlNet": {
            "args": [{"module": "canny", "model": "tiny-canny"}]}}})
        assert r.status_code == 422 and "needs an image" in r.json()["detail"]
        r = c.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": ["nope"]})
        assert r.status_code == 422
        assert wait_for(c, job["id"])["status"] == "succeeded"
