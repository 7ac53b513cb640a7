"""Drop-in compatibility, proven with the real, unmodified PyPI clients against a real server."""

from __future__ import annotations

import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import tolerance
import webuiapi
from PIL import Image
from server import ServerProcess, until

KEY = "sk-test-key"
USER, PASSWORD = "alice", "s3cret"


STYLES = 'name,prompt,negative_prompt\nframed,"{prompt}, in a frame",blurry\nbright,vivid colours,"dull, {prompt}"\n'


@pytest.fixture(scope="module")
def server(models_dir, module_servers):
    (models_dir / "styles.csv").write_text(STYLES)  # A1111's styles file, beside the models
    return module_servers(models_dir, "compat", "--api-key", KEY,
                          "--api-auth", f"{USER}:{PASSWORD},bob:other")


@pytest.fixture(scope="module")
def a1111(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=3,
                             username=USER, password=PASSWORD)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def noise_image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def px(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------- A1111 via webuiapi
def test_webuiapi_txt2img(a1111):
    result = a1111.txt2img(prompt="a red circle", negative_prompt="blue", width=64, height=64, seed=11,
                           batch_size=2, n_iter=2, cfg_scale=6)
    assert len(result.images) == 4 and all(im.size == (64, 64) for im in result.images)
    info = result.info  # webuiapi json.loads the `info` string
    assert info["all_seeds"] == [11, 12, 13, 14] and info["seed"] == 11
    assert info["sampler_name"] == "Euler a" and info["steps"] == 3 and info["cfg_scale"] == 6
    assert info["sd_model_name"] == "tiny" and len(info["sd_model_hash"]) == 10
    assert info["width"] == 64 and info["height"] == 64 and info["batch_size"] == 2
    assert len(info["infotexts"]) == 4 and "Seed: 13" in info["infotexts"][2]
    assert result.images[3].info["parameters"] == info["infotexts"][3]
    assert result.parameters["prompt"] == "a red circle"


def test_webuiapi_styles_apply_as_a1111_applies_them(a1111, server):
    assert a1111.get_prompt_styles() == [
        {"name": "framed", "prompt": "{prompt}, in a frame", "negative_prompt": "blurry"},
        {"name": "bright", "prompt": "vivid colours", "negative_prompt": "dull, {prompt}"}]
    result = a1111.txt2img(prompt="a red circle", negative_prompt="text", styles=["framed", "bright"], width=64,
                           height=64, seed=3)
    # each in order: {prompt} takes the prompt so far, else the style follows it after a comma
    assert result.info["prompt"] == "a red circle, in a frame, vivid colours"
    assert result.info["negative_prompt"] == "dull, text, blurry"
    assert result.info["infotexts"][0].startswith("a red circle, in a frame, vivid colours\nNegative prompt: "
                                                  "dull, text, blurry\n")
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "styles": ["nope"]},
                   auth=(USER, PASSWORD), timeout=60)
    assert r.status_code == 422 and "no style 'nope'" in r.text and "framed" in r.text


def test_webuiapi_prompt_editing(a1111):
    def draw(prompt):
        return a1111.txt2img(prompt=prompt, width=64, height=64, seed=5, steps=4)

    edited = draw("a [red:blue:0.5] circle")
    assert edited.info["prompt"] == "a [red:blue:0.5] circle" and edited.info["ignored_fields"] == []
    assert edited.info["infotexts"][0].startswith("a [red:blue:0.5] circle\n")
    blue = px(draw("a blue circle").images[0])
    assert np.array_equal(px(draw("a [red:blue:0] circle").images[0]), blue)  # switched before the first step
    assert np.abs(px(edited.images[0]) - blue).max() > tolerance.LEVELS  # steps 0-2 of 4 read "red"


def test_webuiapi_reports_ignored_fields(a1111):
    result = a1111.txt2img(prompt="x", width=64, height=64, tiling=True, restore_faces=True)
    assert "restore_faces" in result.info["ignored_fields"]
    assert "tiling" not in result.info["ignored_fields"] and "Tiling: True" in result.info["infotexts"][0]
    assert "eta" not in result.info["ignored_fields"]  # webuiapi's default eta=1.0 changes nothing
    assert "enable_hr" not in result.info["ignored_fields"]  # honoured now (tests/test_hires.py)


def test_what_this_server_lacks_says_so_by_name(server):
    """Face restoration is ignored and reported (A1111 with the feature off); a script or an interrogation it
    cannot run is a 422 naming the field, never a picture made some other way."""
    auth = (USER, PASSWORD)
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2,
                                                            "script_name": "x/y/z plot"}, auth=auth, timeout=60)
    assert r.status_code == 422 and "script_name" in r.text and "x/y/z plot" in r.text
    r = httpx.post(f"{server.url}/sdapi/v1/interrogate", json={"image": "", "model": "clip"}, auth=auth)
    assert r.status_code == 422 and "model" in r.text and "interrogat" in r.text
    r = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", auth=auth,
                   json={"image": "x", "upscaler_1": "Lanczos", "codeformer_visibility": 1})
    assert r.status_code == 422 and "codeformer_visibility" in r.text


def test_webuiapi_img2img(a1111):
    init = Image.new("RGB", (64, 64), (250, 10, 10))  # smooth: a random tiny VAE cannot round-trip noise
    light = a1111.img2img(images=[init], prompt="x", denoising_strength=0.2, width=64, height=64, seed=1, steps=10)
    strong = a1111.img2img(images=[init], prompt="x", denoising_strength=1.0, width=64, height=64, seed=1, steps=10)
    assert light.images[0].size == (64, 64)
    assert np.abs(px(light.images[0]) - px(init)).mean() < np.abs(px(strong.images[0]) - px(init)).mean()
    assert "Denoising strength: 0.2" in light.info["infotexts"][0]


def test_webuiapi_inpainting_keeps_unmasked_pixels(a1111):
    init = noise_image(2)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = a1111.img2img(images=[init], mask_image=mask, prompt="x", inpainting_fill=1, mask_blur=4,
                           denoising_strength=1.0, width=64, height=64, seed=3)
    out, src = px(result.images[0]), px(init)
    border = np.ones((64, 64), bool)
    border[4:60, 4:60] = False
    assert np.array_equal(out[border], src[border])
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 10
    inverted = a1111.img2img(images=[init], mask_image=mask, prompt="x", inpainting_mask_invert=1, mask_blur=0,
                             denoising_strength=1.0, width=64, height=64, seed=3)
    assert np.array_equal(px(inverted.images[0])[16:48, 16:48], src[16:48, 16:48])


def test_webuiapi_lists(a1111):
    models = a1111.get_sd_models()
    titles = {m["title"] for m in models}
    tiny = next(m for m in models if m["model_name"] == "tinyfile")
    assert tiny["title"] == f"tinyfile.safetensors [{tiny['hash']}]" and tiny["sha256"].startswith(tiny["hash"])
    assert any(t.startswith("tiny [") for t in titles)
    samplers = {s["name"]: s for s in a1111.get_samplers()}
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"]["scheduler"] == "karras" and "k_dpmpp_2m" in samplers["DPM++ 2M"]["aliases"]
    assert {s["name"] for s in a1111.get_schedulers()} >= {"automatic", "karras", "exponential"}
    assert a1111.get_loras() == []
    assert "ram" in a1111.get_memory()
    assert a1111.refresh_checkpoints() is None  # A1111 answers 200 with null


def test_webuiapi_progress_while_running_then_interrupt(a1111):
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=a1111.txt2img(prompt="long", width=256, height=256, steps=150,
                                                                         seed=5)))
    worker.start()
    def past_step_two() -> dict | None:
        progress = a1111.get_progress()
        return progress if progress["state"]["sampling_step"] >= 2 else None

    progress = until(past_step_two, "the long call never reached step 2")
    assert progress["state"]["sampling_steps"] == 150 and progress["state"]["job_count"] == 1
    assert 0.01 < progress["progress"] < 1 and progress["eta_relative"] >= 0

    # The live preview (A1111's show_progress_every_n_steps, 10 by default) changes as the picture forms.
    def preview_after(step: int) -> tuple[int, str] | None:
        progress = a1111.get_progress()
        image, at = progress["current_image"], progress["state"]["sampling_step"]
        return (at, image) if image and at >= step else None

    at, first = until(lambda: preview_after(10), "no live preview by step 10")
    _, second = until(lambda: preview_after(at - at % 10 + 10), "the live preview never changed")
    assert first != second
    preview = Image.open(io.BytesIO(base64.b64decode(second)))
    assert preview.format == "JPEG" and preview.size == (32, 32)  # the latent's size: 256 / 8
    assert httpx.get(f"{a1111.baseurl}/progress?skip_current_image=true",
                     auth=(USER, PASSWORD)).json()["current_image"] is None
    a1111.interrupt()
    worker.join(60)
    assert not worker.is_alive()
    assert out["r"].images == []  # stopped before it finished: nothing to return
    assert a1111.get_progress()["state"]["job_count"] == 0


def test_webuiapi_options_switch_model(a1111):
    try:
        title = next(m["title"] for m in a1111.get_sd_models() if m["model_name"] == "tinyfile")
        a1111.util_set_model(title, find_closest=False)  # posts sd_model_checkpoint = "tinyfile.safetensors [hash]"
        assert a1111.get_options()["sd_model_checkpoint"].startswith("tinyfile.safetensors [")
        assert a1111.util_get_current_model().startswith("tinyfile")
        assert a1111.txt2img(prompt="x", width=64, height=64).info["sd_model_name"] == "tinyfile"
        # override_settings applies to that request alone.
        once = a1111.txt2img(prompt="x", width=64, height=64, override_settings={"sd_model_checkpoint": "tiny"})
        assert once.info["sd_model_name"] == "tiny"
        assert a1111.get_options()["sd_model_checkpoint"].startswith("tinyfile")
    finally:
        a1111.set_options({"sd_model_checkpoint": "tiny"})
    assert a1111.get_options()["sd_model_checkpoint"].startswith("tiny [")


def test_webuiapi_options_and_cmd_flags_have_every_a1111_key(a1111, server):
    from sdserve.protocols.a1111 import A1111_CMD_FLAGS, A1111_OPTIONS

    options = a1111.get_options()
    assert set(A1111_OPTIONS) <= set(options) and len(A1111_OPTIONS) > 250
    assert options["send_seed"] is True and options["ESRGAN_tile"] == 192 and options["emphasis"] == "Original"
    try:  # not honoured, but stored and read back, as A1111 keeps it
        a1111.set_options({"send_seed": False, "ESRGAN_tile": 256, "some_extension_option": [1, 2]})
        options = a1111.get_options()
        assert (options["send_seed"], options["ESRGAN_tile"], options["some_extension_option"]) == (False, 256, [1, 2])
    finally:
        a1111.set_options({"send_seed": True, "ESRGAN_tile": 192})
    flags = a1111.get_cmd_flags()
    assert set(A1111_CMD_FLAGS) <= set(flags) and len(A1111_CMD_FLAGS) > 100
    assert flags["api"] is True and flags["port"] == server.port and flags["api_auth"] is None  # never the secrets
    assert flags["esrgan_models_path"].endswith("ESRGAN") and flags["xformers"] is False


def test_webuiapi_png_info(a1111):
    image = a1111.txt2img(prompt="read me back", width=64, height=64, seed=9).images[0]
    result = a1111.png_info(image)
    assert result.info.startswith("read me back\n") and "Seed: 9" in result.info
    params = result.json["parameters"]
    assert params["Seed"] == "9" and params["Prompt"] == "read me back"
    # as A1111 1.10 parses it: WxH split into -1/-2, and its defaults for the keys left out
    assert (params["Size-1"], params["Size-2"]) == ("64", "64") and "Size" not in params
    assert params["Clip skip"] == "1" and params["Hires resize-1"] == 0 and params["RNG"] == "GPU"
    assert params["Sampler"] == "Euler a" and params["Schedule type"] == "Automatic"


def test_a1111_bad_input_is_4xx(server):
    auth = (USER, PASSWORD)
    bad_sampler = httpx.post(server.url + "/sdapi/v1/txt2img", json={"sampler_name": "Euler b"}, auth=auth)
    assert bad_sampler.status_code == 422 and "unknown sampler" in bad_sampler.json()["detail"]
    url = httpx.post(server.url + "/sdapi/v1/img2img", json={"init_images": ["https://example.com/a.png"]}, auth=auth)
    assert url.status_code == 400 and "URLs are not fetched" in url.json()["detail"]
    missing = httpx.post(server.url + "/sdapi/v1/img2img", json={"prompt": "x"}, auth=auth)
    assert missing.status_code == 422
    assert httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, auth=auth).status_code == 422


def test_a1111_basic_auth_required(server):
    r = httpx.get(server.url + "/sdapi/v1/sd-models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(server.url + "/sdapi/v1/sd-models", auth=(USER, "wrong")).status_code == 401
    assert httpx.get(server.url + "/sdapi/v1/sd-models", auth=("bob", "other")).status_code == 200
    with pytest.raises(RuntimeError) as err:  # webuiapi raises (status, text) for a non-200 generation
        webuiapi.WebUIApi(host="127.0.0.1", port=server.port).txt2img(prompt="x", width=64, height=64)
    assert err.value.args[0] == 401


# ---------------------------------------------------------------- OpenAI via openai
def test_openai_generate_b64(oai):
    result = oai.images.generate(model="dall-e-2", prompt="a red circle", n=2, size="64x64",
                                 response_format="b64_json", quality="standard", style="vivid", user="u1")
    assert result.created > 0 and len(result.data) == 2
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.size == (64, 64) and "a red circle" in image.info["parameters"]


def test_openai_generate_url(oai):
    result = oai.images.generate(prompt="x", size="64x72", response_format="url")
    url = result.data[0].url
    assert url.startswith("http://127.0.0.1:") and "/api/v1/images/" in url
    png = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 72)


def test_openai_edit_with_mask(oai):
    init = noise_image(4)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # alpha 0 = edit here (OpenAI's convention)
    files = {}
    for name, im in (("image", init), ("mask", mask)):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        files[name] = ("%s.png" % name, buf.getvalue(), "image/png")
    result = oai.images.edit(image=files["image"], mask=files["mask"], prompt="a hat", size="64x64",
                             response_format="b64_json")
    out = px(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    src = px(init)
    border = np.ones((64, 64), bool)
    border[4:60, 4:60] = False
    assert np.array_equal(out[border], src[border])  # opaque part of the mask: kept
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 10  # transparent part: edited


def test_openai_streams_partial_images(oai):
    # The unmodified SDK, streaming: two previews of the forming picture, then the image.
    events = list(oai.images.generate(model="gpt-image-1", prompt="a red circle", size="64x64", stream=True,
                                      partial_images=2))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    partials = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events[:2]]
    assert all(p.format == "JPEG" and p.size == (64, 64) for p in partials) and events[0].size == "64x64"
    assert px(partials[0]).tolist() != px(partials[1]).tolist()  # two different moments of the picture
    final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
    assert final.size == (64, 64) and "a red circle" in final.info["parameters"]
    assert events[-1].output_format == "png" and events[-1].usage.total_tokens == 0


def test_openai_streams_an_edit_and_refuses_partials_without_stream(oai):
    buf = io.BytesIO()
    noise_image(7).save(buf, format="PNG")
    events = list(oai.images.edit(image=("init.png", buf.getvalue(), "image/png"), prompt="a hat", size="64x64",
                                  stream=True, partial_images=1))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt="x", size="64x64", partial_images=2)
    assert err.value.body["param"] == "partial_images"


def test_openai_models_list(oai):
    ids = {m.id for m in oai.models.list()}
    assert {"tiny", "tinyfile"} <= ids


def test_openai_errors_use_openai_envelope(oai, server):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt="x", size="65x64")
    assert err.value.body["param"] == "size" and "multiples of 8" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        oai.images.generate(prompt="x", model="no-such-model", size="64x64")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server.url + "/v1/images/generations", json={"size": "64x64"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------- SageMaker contract over HTTP
def test_sagemaker_contract(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/ping").status_code == 200  # health checks carry no key
    native = httpx.post(server.url + "/invocations", json={"prompt": "x", "steps": 2, "n": 2, "seed": 4},
                        headers=headers, timeout=60)
    assert native.status_code == 200
    body = native.json()
    assert len(body["images"]) == 2 and body["job"]["status"] == "succeeded"
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][1]))).info["parameters"].count("Seed: 5") == 1
    a1111_style = httpx.post(server.url + "/invocations", timeout=60, headers=headers,
                             json={"prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a",
                                   "batch_size": 1})
    assert a1111_style.status_code == 200 and isinstance(a1111_style.json()["info"], str)
    png = httpx.post(server.url + "/invocations", json={"prompt": "x", "steps": 2}, timeout=60,
                     headers={**headers, "Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    bad = httpx.post(server.url + "/invocations", content=b"not json", headers=headers)
    assert bad.status_code == 400


def test_sagemaker_mode_binds_env_port_and_loads_opt_ml_model(models_dir, tmp_path):
    from server import free_port

    port = free_port()
    # As in the container: `sdserve serve` with SDSERVE_SAGEMAKER=1 (deploy/sagemaker/Dockerfile), no --model, no --port.
    server = ServerProcess(None, tmp_path, port=port, env={
        "SDSERVE_SAGEMAKER": "1", "SAGEMAKER_BIND_TO_PORT": str(port),
        "SDSERVE_SAGEMAKER_MODEL_DIR": str(models_dir / "tiny")})
    server.start()
    try:
        assert httpx.get(server.url + "/ping").status_code == 200
        r = httpx.post(server.url + "/invocations", json={"prompt": "x", "steps": 2}, timeout=60)
        assert r.json()["job"]["request"]["model"] == "tiny"
    finally:
        server.terminate()


# ---------------------------------------------------------------- every dialect through one queue
def test_all_dialects_at_once_share_one_queue(server, a1111, oai):
    def metric(text, source):
        return sum(float(l.split()[-1]) for l in text.splitlines()
                   if l.startswith("sdserve_jobs_submitted_total{") and f'source="{source}"' in l)

    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(server.url + "/metrics", headers=headers).text
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(a1111.txt2img, prompt=f"a{i}", width=64, height=64) for i in range(3)]
        futures += [pool.submit(oai.images.generate, prompt=f"o{i}", size="64x64", response_format="b64_json")
                    for i in range(3)]
        futures += [pool.submit(httpx.post, server.url + "/api/v1/generate", json={"prompt": f"n{i}", "steps": 2},
                                headers=headers, timeout=120) for i in range(3)]
        results = [f.result(timeout=180) for f in futures]
    assert all(len(r.images) == 1 for r in results[:3])
    assert all(len(r.data) == 1 for r in results[3:6])
    assert all(r.status_code == 200 for r in results[6:])
    after = httpx.get(server.url + "/metrics", headers=headers).text
    for source in ("a1111", "openai", "native"):
        assert metric(after, source) - metric(before, source) == 3, source
