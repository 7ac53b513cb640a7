"""The embedded demo model draws what it is asked: pixel statistics of seeded samples, read back with
`demo_data.read` (the rule that reads the generator's own pictures correctly; tests/test_demo_data.py).

Every figure here is also printed by `bench/demo_model.py`, which the README's grid and numbers come from.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image
from server import wait_for

from sdserve.core import inline_inputs
from sdserve.demo import data as demo_data
from sdserve.demo.data import Scene, read
from sdserve.schema import GenerationRequest

# The bars each figure must reach (issue 12).
BARS = {"colour": 0.90, "shape": 0.80, "region": 0.85, "background": 0.90}


@pytest.fixture(scope="module")
def demo_engine(tmp_path_factory):
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine

    registry = ModelRegistry(tmp_path_factory.mktemp("no-models"), tmp_path_factory.mktemp("data"), extra=["demo"],
                             device="cpu")
    return Engine(registry)


def generate(engine, prompts: list[str], seeds: list[int], **fields) -> list[Image.Image]:
    """One engine call (one batch) of one image per prompt."""
    queued, inputs = inline_inputs([GenerationRequest(prompt=p, seed=s, **fields) for p, s in zip(prompts, seeds)])
    return [images[0].image for images in engine.run(queued, inputs=inputs)]


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_samples_draw_the_prompted_colour_shape_region_and_background(demo_engine):
    """The 50 seeded scenes, prompted in full, at CFG 7."""
    scenes = demo_data.test_scenes(50)
    images = generate(demo_engine, [demo_data.prompt(s) for s in scenes], list(range(1000, 1050)), cfg_scale=7.0)
    figures = demo_data.adherence(scenes, [read(im) for im in images])
    for name, bar in BARS.items():
        assert figures[name] >= bar, (name, figures)


def test_guidance_raises_adherence(demo_engine):
    """Full prompts are drawn right at any CFG (bench/demo_model.py prints both); guidance shows where the text
    alone says little, "a red shape"."""
    prompts, seeds, colours = demo_data.colour_only_prompts()
    hits = {cfg: np.mean([read(im).colour == c for im, c in
                          zip(generate(demo_engine, prompts, seeds, cfg_scale=cfg), colours)]) for cfg in (7.0, 1.0)}
    assert hits[7.0] >= hits[1.0] + 0.1, hits


def test_negative_prompt_of_the_colour_lowers_its_share(demo_engine):
    prompt, negative_prompt, seeds = demo_data.NEGATIVE_PROBE
    plain = [read(im).share["red"] for im in generate(demo_engine, [prompt] * len(seeds), seeds)]
    negative = [read(im).share["red"] for im in
                generate(demo_engine, [prompt] * len(seeds), seeds, negative_prompt=negative_prompt)]
    assert np.mean(negative) < 0.6 * np.mean(plain), (np.mean(negative), np.mean(plain))


def test_img2img_low_strength_keeps_the_layout_high_strength_takes_the_new_colour(demo_engine):
    scene = Scene("green", "square", "large", "left", "white")
    init = demo_data.draw(scene)
    seeds = list(range(3000, 3008))
    kept = generate(demo_engine, [demo_data.prompt(scene)] * 8, seeds, init_image=b64png(init), strength=0.3)
    original = np.asarray(init, dtype=np.float32).ravel()
    correlations = [np.corrcoef(original, np.asarray(im, dtype=np.float32).ravel())[0, 1] for im in kept]
    assert min(correlations) > 0.9, correlations
    recoloured = generate(demo_engine, [demo_data.prompt(Scene("purple", "square", "large", "left", "white"))] * 8,
                          seeds, init_image=b64png(init), strength=0.9)
    colours = [read(im).colour for im in recoloured]
    assert colours.count("purple") >= 7, colours


def test_inpaint_keeps_unmasked_pixels_and_paints_the_prompted_colour(demo_engine):
    init = demo_data.draw(Scene("red", "circle", "large", "left", "white"))
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half
    prompt = demo_data.prompt(Scene("blue", "square", "small", "right", "white"))
    images = generate(demo_engine, [prompt] * 8, list(range(4000, 4008)), init_image=b64png(init),
                      mask=b64png(mask), mask_blur=0, inpaint_fill="noise", strength=1.0)
    for image in images:
        pixels = np.asarray(image)
        assert np.array_equal(pixels[:, :32], np.asarray(init)[:, :32])
    blue = [read(image.crop((32, 0, 64, 64))).colour == "blue" for image in images]
    assert sum(blue) >= 7, blue


def test_prompts_in_one_batch_are_not_swapped(demo_engine):
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "black"]
    prompts = [f"a large {c} circle in the middle on a white background" for c in colours]
    images = generate(demo_engine, prompts, [5000] * 8)
    assert [read(im).colour for im in images] == colours


# ---------------------------------------------------------------- through the server, every dialect
PROMPT = "a large blue square in the middle on a yellow background"


@pytest.fixture(scope="module")
def demo_server(module_servers):
    return module_servers(None, "demo-server", "--max-batch", "8",
                          "--batch-wait-ms", "50")


def png_of(content: bytes) -> Image.Image:
    return Image.open(io.BytesIO(content)).convert("RGB")


def test_every_dialect_passes_the_prompt_to_the_model(demo_server):
    url = demo_server.url
    got: dict[str, Image.Image] = {}
    with demo_server.client() as c:
        job = c.post("/api/v1/jobs", json={"prompt": PROMPT, "seed": 1}).json()
        got["native"] = png_of(c.get(wait_for(c, job["id"])["images"][0]["url"]).content)
        got["GET /?prompt="] = png_of(c.get("/", params={"prompt": PROMPT, "seed": 1}).content)
        download = c.post("/generate", json={"prompt": PROMPT, "seed": 1, "steps": 20}).json()["download_id"]
        got["POST /generate"] = png_of(c.get(f"/download/{download}").content)
        sagemaker = c.post("/invocations", json={"prompt": PROMPT, "seed": 1}).json()
        got["SageMaker"] = png_of(base64.b64decode(sagemaker["images"][0]))
    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=demo_server.port)
    got["A1111 (webuiapi)"] = a1111.txt2img(prompt=PROMPT, seed=1, width=64, height=64, steps=20).image.convert("RGB")
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    data = oai.images.generate(prompt=PROMPT, size="64x64", response_format="b64_json").data[0]
    got["OpenAI (SDK)"] = png_of(base64.b64decode(data.b64_json))
    readings = {dialect: read(image) for dialect, image in got.items()}
    assert {d: (r.colour, r.background) for d, r in readings.items()} == {
        d: ("blue", "yellow") for d in readings}


def test_a_batch_of_eight_prompts_through_the_queue_keeps_each_prompt(demo_server):
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "white"]
    with demo_server.client() as c:
        blocker = c.post("/api/v1/jobs", json={"prompt": "blocker", "steps": 150, "width": 256, "height": 256}).json()
        wait_for(c, blocker["id"], ("running",))
        ids = [c.post("/api/v1/jobs", json={"prompt": f"a large {colour} triangle in the middle on a black background",
                                            "seed": 6000 + i}).json()["id"] for i, colour in enumerate(colours)]
        c.delete(f"/api/v1/jobs/{blocker['id']}")
        jobs = [wait_for(c, i) for i in ids]
        with ThreadPoolExecutor(8) as pool:
            images = list(pool.map(lambda j: png_of(c.get(j["images"][0]["url"]).content), jobs))
    assert len({j["batch_id"] for j in jobs}) == 1 and jobs[0]["batch_images"] == 8
    assert [read(im).colour for im in images] == colours
