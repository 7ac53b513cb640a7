import base64
import io

import numpy as np
import pytest
from PIL import Image

from sdserve.core import RequestRejected, inline_inputs
from sdserve.engine import samplers
from sdserve.engine.pipeline import Cancelled, InvalidRequestError, batch_key
from sdserve.schema import GenerationRequest


def req(**kw):
    base = dict(prompt="a red circle", seed=1, steps=3, width=64, height=64)
    return GenerationRequest(**{**base, **kw})


def run(engine, *requests, **kw):
    """engine.run on client-style requests: input images decoded as the server does at submission."""
    queued, inputs = inline_inputs(requests)
    return engine.run(queued, inputs=inputs, **kw)


def arr(image):
    return np.asarray(image, dtype=np.int16)


def b64(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_same_seed_same_pixels_different_seed_differs(engine):
    a = run(engine, req(seed=42))[0][0]
    b = run(engine, req(seed=42))[0][0]
    c = run(engine, req(seed=43))[0][0]
    assert a.seed == 42 and a.image.size == (64, 64)
    assert np.array_equal(arr(a.image), arr(b.image))
    assert not np.array_equal(arr(a.image), arr(c.image))


def test_image_i_uses_seed_plus_i(engine):
    batch = run(engine, req(seed=100, n=2))[0]
    assert [g.seed for g in batch] == [100, 101]
    alone = run(engine, req(seed=101))[0][0]
    # Same pixels up to float noise from the batched UNet pass.
    assert np.abs(arr(batch[1].image) - arr(alone.image)).max() <= 1
    assert "Seed: 101" in batch[1].infotext


def test_random_seed_is_drawn_and_reported(engine):
    result = run(engine, req(seed=-1))[0][0]
    assert 0 <= result.seed < 2**32
    assert f"Seed: {result.seed}" in result.infotext


def test_requests_in_a_batch_keep_their_own_prompts(engine):
    red, blue = run(engine, req(prompt="red", seed=5), req(prompt="blue", seed=5))
    assert red[0].infotext.startswith("red\n") and blue[0].infotext.startswith("blue\n")
    assert not np.array_equal(arr(red[0].image), arr(blue[0].image))


def test_default_size_is_the_models_native_size(engine):
    result = run(engine, GenerationRequest(prompt="x", seed=1, steps=2))[0][0]
    assert result.image.size == (64, 64)


@pytest.mark.parametrize("name", samplers.sampler_names())
def test_every_sampler_runs_two_steps(engine, name):
    steps_seen = []
    result = run(engine, req(sampler=name, steps=2), on_step=lambda s, n: steps_seen.append((s, n)))[0][0]
    assert result.image.size == (64, 64)
    assert steps_seen and steps_seen[-1][0] == steps_seen[-1][1]  # progress reached 100%
    assert f"Sampler: {name}," in result.infotext


def test_legacy_sampler_name_and_schedule_in_infotext(engine):
    result = run(engine, req(sampler="DPM++ 2M Karras"))[0][0]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in result.infotext


def test_unknown_sampler_is_a_client_error(engine):
    with pytest.raises(InvalidRequestError, match="valid:"):
        run(engine, req(sampler="Euler b"))


def test_progress_callback_and_cancellation(engine):
    seen = []

    def stop_at_two(step, total):
        seen.append(step)
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run(engine, req(steps=10), on_step=stop_at_two)
    assert seen == [1, 2]


def test_img2img_follows_the_init_image(engine):
    init = Image.new("RGB", (64, 64), (250, 10, 10))
    light = run(engine, req(init_image=b64(init), strength=0.2, steps=10))[0][0]
    strong = run(engine, req(init_image=b64(init), strength=1.0, steps=10))[0][0]
    target = arr(init)
    assert np.abs(arr(light.image) - target).mean() < np.abs(arr(strong.image) - target).mean()
    assert "Denoising strength: 0.2" in light.infotext


def test_img2img_default_size_is_the_init_images(engine):
    init = Image.new("RGB", (100, 72), "white")
    result = run(engine, GenerationRequest(prompt="x", seed=1, steps=2, init_image=b64(init)))[0][0]
    assert result.image.size == (96, 72)


def test_inpainting_leaves_unmasked_pixels_exactly_unchanged(engine):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))  # white = repaint
    result = run(engine, req(init_image=b64(init), mask=b64(mask), strength=1.0, mask_blur=4))[0][0]
    out, src = arr(result.image), arr(init)
    # Outside the blurred mask (blur radius 4 → stay 12 px away): identical.
    outside = np.ones((64, 64), bool)
    outside[4:60, 4:60] = False
    assert np.array_equal(out[outside], src[outside])
    # Inside, the model repainted.
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 10
    assert "Mask blur: 4" in result.infotext


def test_bad_image_is_a_client_error(engine):
    with pytest.raises(RequestRejected, match="cannot read image"):
        run(engine, req(init_image=base64.b64encode(b"not an image").decode()))
    with pytest.raises(InvalidRequestError, match="not given"):
        engine.run(inline_inputs([req(init_image=b64(Image.new("RGB", (64, 64))))])[0])


def test_mask_invert_repaints_the_other_side(engine):
    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = run(engine, req(init_image=b64(init), mask=b64(mask), mask_invert=True, mask_blur=0, strength=1.0))[0][0]
    out, src = arr(result.image), arr(init)
    assert np.array_equal(out[16:48, 16:48], src[16:48, 16:48])  # white area now kept
    assert np.abs(out[:8] - src[:8]).mean() > 10  # black area repainted


@pytest.mark.parametrize("fill", ["fill", "noise", "nothing"])
def test_inpaint_fill_modes_keep_outside_and_change_inside(engine, fill):
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = run(engine, req(init_image=b64(init), mask=b64(mask), inpaint_fill=fill, mask_blur=0, strength=0.5))[0][0]
    out, src = arr(result.image), arr(init)
    assert np.array_equal(out[:16], src[:16])
    assert np.abs(out[20:44, 20:44] - src[20:44, 20:44]).mean() > 5


def test_crop_resize_keeps_aspect(engine):
    # Left half red, right half blue, 128x64: cropping to 64x64 keeps the centre, half of each colour.
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    wide.paste((0, 0, 255), (64, 0, 128, 64))
    (crop,), inputs = inline_inputs([req(init_image=b64(wide), resize_mode="crop")])
    centre = arr(engine._prepare(crop, batch_key(crop), inputs).init_image)
    assert centre[:, :20, 0].mean() > 200 and centre[:, -20:, 2].mean() > 200
    (resize,), inputs = inline_inputs([req(init_image=b64(wide))])
    assert engine._prepare(resize, batch_key(resize), inputs).init_image.size == (64, 64)
