"""Step previews: which projection a VAE gets, when the engine draws them and for whom, and what they show."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from sdserve.engine import previews
from sdserve.schema import JobRequest


def vae_config(scaling_factor: float, blocks=(128, 256, 512, 512)):
    return SimpleNamespace(block_out_channels=list(blocks), latent_channels=4, scaling_factor=scaling_factor)


def test_sd_families_take_the_published_coefficients_and_others_are_fitted():
    assert previews.published(vae_config(0.18215)) is previews.SD1_COEFFICIENTS
    assert previews.published(vae_config(0.13025)) is previews.SDXL_COEFFICIENTS
    assert previews.published(vae_config(0.2696, blocks=(16, 32, 64, 128))) is None  # the demo's own VAE
    assert previews.published(vae_config(0.5)) is None


def test_encode_is_a_bounded_jpeg():
    from PIL import Image

    data, width, height = previews.encode(Image.new("RGB", (2048, 512), (200, 10, 10)))
    assert (width, height) == (previews.MAX_SIDE, previews.MAX_SIDE // 4) and len(data) < 20_000


def test_the_engine_draws_each_requests_previews_at_its_steps(engine):
    plain = JobRequest(prompt="b", steps=6, seed=2, preview_every=0)
    watched = JobRequest(prompt="a", steps=6, seed=1, preview_every=2, n=2)
    every3 = JobRequest(prompt="c", steps=6, seed=3, preview_every=3)
    seen = []
    order = []
    engine.run([plain, watched, every3], on_step=lambda step, steps: order.append(("step", step)),
               on_preview=lambda step, pictures: (seen.append((step, {k: v.size for k, v in pictures.items()})),
                                                   order.append(("preview", step))))
    # request 1 (two images side by side) at steps 2 and 4, request 2 at 3; none at the last step (the image is
    # coming) and none for request 0
    assert seen == [(2, {1: (16, 8)}), (3, {2: (8, 8)}), (4, {1: (16, 8)})]
    assert order.index(("preview", 2)) + 1 == order.index(("step", 2))  # told just before its step


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine

    root = tmp_path_factory.mktemp("previews")
    return Engine(ModelRegistry(root / "models", root / "data", device="cpu", optimize=["none"]))


def test_a_demo_preview_shows_the_picture_forming(demo):
    """The fitted projection of the demo's VAE, on the scheduler's prediction of the finished picture: the last
    preview's pixels follow the image's. A linear preview of the demo's tiny VAE is rough, as A1111's "Approx
    cheap" is (measured on 12 scenes at step 15 of 20: pixel correlation 0.6 / 0.24 / 0.63 in R / G / B, and 0.2
    / 0.16 / 0.4 from the noisy sample instead of the prediction)."""
    from sdserve.demo import data as demo_data

    scenes = demo_data.test_scenes(12)
    requests = [JobRequest(prompt=demo_data.prompt(scene), model="demo", steps=20, seed=i, preview_every=5)
                for i, scene in enumerate(scenes)]
    last: dict[int, object] = {}
    results = demo.run(requests, on_step=lambda *_: None, on_preview=lambda step, p: last.update(p))
    final = np.concatenate([np.asarray(r[0].image.resize((8, 8)), float).reshape(-1, 3) for r in results])
    shown = np.concatenate([np.asarray(last[i], float).reshape(-1, 3) for i in range(len(requests))])
    correlation = [np.corrcoef(final[:, c], shown[:, c])[0, 1] for c in range(3)]
    assert np.mean(correlation) > 0.3 and min(correlation) > 0.1, correlation


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM"])
def test_previews_never_change_the_picture(engine, sampler):
    """Watching the scheduler's prediction keeps its step's signature: an ancestral sampler still gets its seeded
    generator (without it, it drew from the global RNG: another picture on every run)."""
    def draw(every: int):
        request = JobRequest(prompt="a red circle", steps=4, seed=5, sampler=sampler, preview_every=every)
        seen = []
        [[image]] = engine.run([request], on_step=lambda *_: None, on_preview=lambda step, p: seen.append(step))
        return np.asarray(image.image), seen

    plain, none_seen = draw(0)
    watched, seen = draw(1)
    assert none_seen == [] and seen == [1, 2, 3]
    assert np.array_equal(plain, watched)  # the same path, the same pixels
