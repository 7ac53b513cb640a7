"""The web UI in a real browser: Playwright driving Debian's Chromium against a real server with the demo model.

Set SDSERVE_SCREENSHOTS=docs to save screenshots of the main screens there.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from server import ServerProcess, wait_for

from sdserve.demo import data as demo_data

CHROMIUM = os.environ.get("SDSERVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium: apt-get install chromium (CI installs it)")
SHOTS = os.environ.get("SDSERVE_SCREENSHOTS")
# Chromium on a closed network: no background services that would try to phone home.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
LONG = {"steps": 150, "width": 256, "height": 256}


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo model, with a LoRA and a ControlNet written for it in the models folder."""
    from diffusers import StableDiffusionPipeline
    from tinymodels import lora_factors, save_controlnet, save_lora

    from sdserve.engine.demo import DEMO_PATH

    models = tmp_path_factory.mktemp("web-models")
    demo = StableDiffusionPipeline.from_pretrained(DEMO_PATH, safety_checker=None)
    save_lora(lora_factors(demo, seed=1, scale=0.05), models / "Lora" / "demo-style.safetensors", "kohya")
    save_controlnet(demo.to(dtype=torch.float32), models / "ControlNet" / "demo-canny")
    proc = ServerProcess(None, tmp_path_factory.mktemp("web"), "--models-dir", str(models), "--model", "demo").start()
    yield proc
    proc.terminate()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    yield page
    context.close()
    assert not errors, errors


def latest_card(page):
    return page.locator("#jobs .card").first


def submit_and_wait(page, status="succeeded", timeout=60_000):
    before = page.locator("#jobs .card").count()
    page.click("#generate")
    page.wait_for_function(f"() => document.querySelectorAll('#jobs .card').length > {before}")
    card = latest_card(page)
    card.locator(f"xpath=self::*[@data-status='{status}']").wait_for(timeout=timeout)
    return card


def api_job(server, card) -> dict:
    return httpx.get(f"{server.url}/api/v1/jobs/{card.get_attribute('data-job-id')}").json()


def png_bytes() -> bytes:
    """The upload: one of the demo model's own pictures, a large yellow star on purple."""
    buf = io.BytesIO()
    demo_data.draw(demo_data.Scene("yellow", "star", "large", "middle", "purple")).save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_has_a_label(page):
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(el => el.type !== 'radio' || !el.closest('label'))
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
        .map(el => el.id || el.name)""")
    assert unlabeled == []


def test_the_form_takes_the_servers_bounds(browser, servers):
    """A server whose operator tightened the bounds: the form's limits are that server's, not built-in ones."""
    server = servers(None, "tight", "--model", "demo", env={"SDSERVE_MAX_STEPS": "30", "SDSERVE_MAX_SIZE": "512",
                                                            "SDSERVE_MAX_IMAGES": "3"})
    limits = httpx.get(server.url + "/api/v1/limits").json()
    assert (limits["max_steps"], limits["max_size"], limits["max_images"]) == (30, 512, 3)
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    attrs = page.evaluate("""() => Object.fromEntries(['width', 'height', 'steps', 'n'].map(id =>
        [id, [document.getElementById(id).max, document.getElementById(id).step]]))""")
    steps = page.input_value("#steps")
    context.close()
    assert attrs["width"] == attrs["height"] == ["512", str(limits["size_step"])]
    assert (attrs["steps"][0], attrs["n"][0]) == ("30", "3") and steps == str(limits["default_steps"])


def test_generate_shows_progress_and_the_image(page, server):
    # Record every progress value the card shows, as pushed by Server-Sent Events.
    page.evaluate("""() => { window.seen = [];
        new MutationObserver(ms => ms.forEach(m => m.target.dataset && m.target.dataset.progress !== undefined
            && window.seen.push(Number(m.target.dataset.progress))))
          .observe(document.getElementById('jobs'), {subtree: true, attributes: true, attributeFilter: ['data-progress']});
        window.previews = [];  // and every forming picture the card shows (`preview` events)
        new MutationObserver(ms => ms.forEach(m => m.target.classList.contains('preview')
            && window.previews.push({src: m.target.src, step: Number(m.target.dataset.step)})))
          .observe(document.getElementById('jobs'), {subtree: true, attributes: true, attributeFilter: ['src']}); }""")
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#negative_prompt", "")  # a clean form: an earlier test may have left a negative prompt there
    page.fill("#steps", "100")  # enough steps at the demo's 64x64 to see progress between start and end
    page.fill("#seed", "1234")
    card = submit_and_wait(page)
    img = card.locator(".thumbs img").first
    img.wait_for()
    page.wait_for_function("() => document.querySelector('#jobs .card .thumbs img').naturalWidth > 0")
    assert card.locator("progress").evaluate("p => p.value") == 1
    assert card.locator(".progress-text").inner_text() == "100/100"
    seen = page.evaluate("() => window.seen")
    assert any(0 < v < 1 for v in seen) and seen[-1] == 1, seen
    # The picture formed on the card: a preview every 20 of the 100 steps, hidden once the images came.
    previews = page.evaluate("() => window.previews")
    assert [p["step"] for p in previews] == [20, 40, 60, 80], [p["step"] for p in previews]
    assert card.locator(".preview").is_hidden()
    last = Image.open(io.BytesIO(base64.b64decode(previews[-1]["src"].split(",", 1)[1]))).convert("RGB")
    assert previews[-1]["src"].startswith("data:image/jpeg;base64,") and last.size == (8, 8)  # the latent's size
    red, _, blue = np.asarray(last, dtype=float).reshape(-1, 3).mean(axis=0)
    assert blue > red + 20, (red, blue)  # the blue background is already there
    job = api_job(server, card)
    assert job["request"]["preview_every"] == 20
    assert job["request"]["negative_prompt"] == "" and job["images"][0]["seed"] == 1234
    # What a newcomer types first, drawn: the demo model follows the prompt.
    drawn = demo_data.read(Image.open(io.BytesIO(httpx.get(server.url + job["images"][0]["url"]).content)))
    assert (drawn.colour, drawn.shape, drawn.background) == ("red", "circle", "blue")
    shot(page, "generate")


def test_ctrl_enter_and_seed_buttons(page, server):
    page.fill("#prompt", "keyboard")
    page.fill("#steps", "4")
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    before = page.locator("#jobs .card").count()
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_function(f"() => document.querySelectorAll('#jobs .card').length > {before}")
    latest_card(page).locator("xpath=self::*[@data-status='succeeded']").wait_for(timeout=60_000)
    seed = api_job(server, latest_card(page))["images"][0]["seed"]
    page.click("#seed-last")
    assert page.input_value("#seed") == str(seed)


def test_cancel_a_running_job(page):
    page.fill("#prompt", "long")
    page.fill("#steps", "150")
    page.select_option("#size-preset", "256x256")
    before = page.locator("#jobs .card").count()
    page.click("#generate")
    page.wait_for_function(f"() => document.querySelectorAll('#jobs .card').length > {before}")
    card = latest_card(page)
    card.locator("xpath=self::*[@data-status='running']").wait_for(timeout=30_000)
    card.locator(".cancel").click()
    card.locator("xpath=self::*[@data-status='canceled']").wait_for(timeout=30_000)
    assert card.locator(".thumbs img").count() == 0


def upload(page):
    page.click("label.tab:has(input[value=img2img])")
    page.set_input_files("#init-file", files=[{"name": "src.png", "mimeType": "image/png", "buffer": png_bytes()}])
    page.wait_for_selector("#canvas-wrap:not([hidden])")


def test_lora_picker_and_a_controlnet_unit(page, server):
    assert page.locator("#lora option").all_inner_texts() == ["demo-style"]
    page.fill("#prompt", "a red circle")
    page.fill("#lora-weight", "0.5")
    page.click("#lora-add")
    assert page.input_value("#prompt") == "a red circle <lora:demo-style:0.5>"
    page.click("#controlnet-section summary")
    page.set_input_files("#control-file", files=[{"name": "c.png", "mimeType": "image/png", "buffer": png_bytes()}])
    page.wait_for_selector("#control-preview:not([hidden])")
    page.select_option("#control-module", "canny")
    page.select_option("#control-model", "demo-canny")
    page.fill("#steps", "4")
    card = submit_and_wait(page)
    request = api_job(server, card)["request"]
    assert request["prompt"] == "a red circle" and request["loras"] == [{"name": "demo-style", "weight": 0.5}]
    unit = request["controlnet"][0]
    assert (unit["module"], unit["model"], unit["weight"]) == ("canny", "demo-canny", 1.0) and len(unit["image"]) == 32


def test_upload_and_img2img(page, server):
    upload(page)
    page.fill("#prompt", "a large green star in the middle on a purple background")
    page.fill("#steps", "10")
    page.locator("#strength").evaluate("el => { el.value = 0.5; el.dispatchEvent(new Event('input')); }")
    card = submit_and_wait(page)
    request = api_job(server, card)["request"]
    # The job keeps the image store key of its input, not the image.
    assert len(request["init_image"]) == 32 and request["mask"] is None and request["strength"] == 0.5
    shot(page, "img2img")


def test_paint_a_mask_and_inpaint(page, server):
    upload(page)
    page.fill("#prompt", "a large blue circle on a purple background")
    page.fill("#steps", "10")
    page.locator("#mask-canvas").scroll_into_view_if_needed()  # filling steps scrolled the form panel
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    shot(page, "inpaint-mask")
    card = submit_and_wait(page)
    job = api_job(server, card)
    assert httpx.get(server.url + "/api/v1/images/" + job["request"]["mask"]).status_code == 200  # stored by key
    # Outside the painted stroke the source pixels come back unchanged.
    png = httpx.get(server.url + job["images"][0]["url"]).content
    out = Image.open(io.BytesIO(png)).convert("RGB")
    src = Image.open(io.BytesIO(png_bytes())).convert("RGB")
    assert out.getpixel((1, 62)) == src.getpixel((1, 62)) and out.getpixel((62, 1)) == src.getpixel((62, 1))
    # Clear empties the mask: the next run is plain img2img.
    page.click("#clear-mask")
    assert api_job(server, submit_and_wait(page))["request"]["mask"] is None


def test_history_survives_reload_and_reuse_parameters(page, server):
    page.fill("#prompt", "remember me")
    page.fill("#steps", "6")
    page.fill("#seed", "77")
    submit_and_wait(page)
    ids = page.locator("#jobs .card").evaluate_all("cards => cards.map(c => c.dataset.jobId)")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    after = page.locator("#jobs .card").evaluate_all("cards => cards.map(c => c.dataset.jobId)")
    assert after[: len(ids)] == ids
    page.fill("#prompt", "something else")
    page.fill("#seed", "-1")
    card = latest_card(page)
    card.locator(".thumbs img").first.click()
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("() => document.getElementById('viewer-info').textContent.includes('Seed: 77')")
    assert page.get_attribute("#viewer-download", "download") == "sdserve-77.png"
    shot(page, "viewer")
    page.click("#viewer-reuse")
    page.wait_for_selector("#viewer:not([open])", state="attached")
    assert page.input_value("#prompt") == "remember me"
    assert page.input_value("#seed") == "77" and page.input_value("#steps") == "6"
    assert page.input_value("#scheduler") == "sgm_uniform"  # "Schedule type: SGM Uniform" mapped back to its name


@pytest.mark.parametrize("prompt", ["a cat\nNegative prompt: evil\nSteps: 99, Sampler: Euler, Seed: 5", '"quoted"',
                                    " spaced ", "plain, (emphasis:1.2), a:b"])
def test_the_page_reads_infotext_as_the_server_writes_it(page, prompt):
    """Reuse parameters reads the prompt the server wrote, even one written as a JSON string (engine/infotext.py)."""
    from sdserve.engine import infotext

    text = infotext.build(prompt, "neg\nlines", {"Steps": 3, "Sampler": "Euler", "Seed": 1})
    parsed = page.evaluate("async text => (await import('/ui/infotext.js')).parseInfotext(text)", text)
    assert {k: parsed[k] for k in ("Prompt", "Negative prompt", "Steps", "Seed")} == {
        "Prompt": prompt, "Negative prompt": "neg\nlines", "Steps": "3", "Seed": "1"}


def test_send_result_to_img2img(page):
    page.fill("#prompt", "source")
    page.fill("#steps", "4")
    card = submit_and_wait(page)
    card.locator(".thumbs img").first.click()
    page.click("#viewer-img2img")
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    assert page.is_checked("input[name=mode][value=img2img]")


def test_bad_input_names_the_field(page):
    page.fill("#prompt", "x")
    page.fill("#width", "100")  # not a multiple of 8
    page.fill("#height", "64")
    page.click("#generate")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "width" in page.inner_text("#form-error")
    assert page.get_attribute("#width", "aria-invalid") == "true"


def test_queue_full_shows_retry_time(browser, tmp_path):
    server = ServerProcess(None, tmp_path, "--model", "demo", "--max-queue", "1").start()
    try:
        with server.client() as c:
            blocker = c.post("/api/v1/jobs", json={"prompt": "b", **LONG}).json()["id"]
            wait_for(c, blocker, ("running",))
            c.post("/api/v1/jobs", json={"prompt": "fills the queue", **LONG})
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='1']")
            page.fill("#prompt", "one too many")
            page.click("#generate")
            page.wait_for_selector("#form-error:not([hidden])")
            message = page.inner_text("#form-error")
            assert "queue is full" in message and "Try again in" in message
            shot(page, "queue-full")
            page.close()
            for job in c.get("/api/v1/jobs").json():
                if job["status"] in ("queued", "running"):
                    c.delete(f"/api/v1/jobs/{job['id']}")
    finally:
        server.terminate()


def test_older_jobs_page_in_and_a_blocked_image_says_why(browser, tmp_path):
    from test_moderation import Hook

    hook = Hook()  # blocks images whose prompt says "forbidden"
    server = ServerProcess(None, tmp_path, "--model", "demo", "--moderation", hook.url,
                           env={"SDSERVE_ENGINE": "noop"}).start()
    try:
        with server.client() as c:
            ids = [c.post("/api/v1/jobs", json={"prompt": f"job {i}", "steps": 1}).json()["id"] for i in range(44)]
            ids.append(c.post("/api/v1/jobs", json={"prompt": "forbidden", "steps": 1}).json()["id"])
            for job_id in ids:
                wait_for(c, job_id)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        cards = page.locator("#jobs .card")
        assert cards.count() == 40 and page.is_visible("#older")
        page.wait_for_selector("#jobs .card .thumbs .blocked")
        assert latest_card(page).locator(".thumbs .blocked").inner_text() == "blocked: forbidden"
        page.click("#older")
        page.wait_for_function("() => document.querySelectorAll('#jobs .card').length === 45")
        assert page.is_hidden("#older")
        shown = cards.evaluate_all("cards => cards.map(c => c.dataset.jobId)")
        assert shown == ids[::-1]  # newest first, each once
        page.close()
    finally:
        server.terminate()
        hook.close()


def test_api_key_prompt(browser, tmp_path):
    server = ServerProcess(None, tmp_path, "--model", "demo", "--api-key", "let-me-in").start()
    try:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        shot(page, "api-key")
        page.fill("#api-key", "wrong")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-dialog[open] #key-error:not([hidden])")
        page.fill("#api-key", "let-me-in")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#model option").count() >= 1
        assert page.evaluate("() => localStorage.getItem('sdserve.apiKey')") == "let-me-in"
        page.fill("#prompt", "with a key")
        page.fill("#steps", "4")
        card = submit_and_wait(page)
        page.wait_for_function("() => document.querySelector('#jobs .card .thumbs img')?.naturalWidth > 0")
        assert card.locator(".thumbs img").count() == 1
        page.close()
    finally:
        server.terminate()


@pytest.mark.parametrize("width", [360, 390])
def test_phone_width_has_no_horizontal_scroll(browser, server, width):
    context = browser.new_context(viewport={"width": width, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    page.click("label.tab:has(input[value=img2img])")
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.click("label.tab:has(input[value=txt2img])")
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    if width == 390:
        shot(page, "phone")
    context.close()


def test_dark_and_light_follow_the_system(browser, server):
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme=scheme)
        page = context.new_page()
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']")
        rgb = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        backgrounds[scheme] = sum(int(v) for v in rgb[rgb.index("(") + 1:-1].split(",")[:3]) / 3
        if scheme == "dark":
            shot(page, "dark")
        context.close()
    assert backgrounds["light"] > 200 > 60 > backgrounds["dark"]
