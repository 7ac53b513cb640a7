"""SDXL's two text encoders read prompts A1111's way too: emphasis, BREAK and chunks past 77 tokens on both
encoders, the pooled embedding from the second's first chunk, an empty negative prompt as zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinymodels import build_tiny_sdxl

from sdserve import core
from sdserve.engine import prompts
from sdserve.engine.models import ModelRegistry
from sdserve.engine.pipeline import Engine
from sdserve.schema import GenerationRequest


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-models")
    build_tiny_sdxl().save_pretrained(root / "tinyxl", safe_serialization=True)
    engine = Engine(ModelRegistry(root, tmp_path_factory.mktemp("sdxl-data"), extra=["tinyxl"], device="cpu"))
    return engine


def test_conditioning_concatenates_both_encoders_and_pools_the_second(sdxl):
    pipe = sdxl.registry.load(None).pipelines["txt2img"]
    out = prompts.conditioning(pipe, ["a red circle", "x" * 100], ["", "blurry"])
    assert out["prompt_embeds"].shape == (2, 154, 64)  # the longest prompt is 2 chunks; both encoders, 32 + 32
    assert out["pooled_prompt_embeds"].shape == (2, 32)
    assert torch.count_nonzero(out["negative_prompt_embeds"][0]) == 0  # empty negative: zeros, as SDXL is used
    assert torch.count_nonzero(out["negative_pooled_prompt_embeds"][0]) == 0
    assert torch.count_nonzero(out["negative_prompt_embeds"][1]) > 0


def pixels(engine, prompt):
    (queued,), _ = core.inline_inputs([GenerationRequest(prompt=prompt, seed=5, steps=3)])
    return engine.run([queued])[0][0].pixels


def test_sdxl_emphasis_and_long_prompts_change_the_picture(sdxl):
    plain = pixels(sdxl, "a red circle")
    assert np.array_equal(pixels(sdxl, "a (red:1.0) circle"), plain)
    assert np.abs(pixels(sdxl, "a (red:1.6) circle") - plain).max() > 1e-4
    base = "x" * 100
    assert np.abs(pixels(sdxl, base + " red") - pixels(sdxl, base + " blue")).max() > 1e-4


def test_sdxl_prompt_editing_swaps_both_encoders_and_the_pooled_embedding(sdxl):
    pipe = sdxl.registry.load(None).pipelines["txt2img"]
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (kwargs["encoder_hidden_states"][1], kwargs["added_cond_kwargs"]["text_embeds"][1])), with_kwargs=True)
    try:
        pixels(sdxl, "a [red:blue:0.5] circle")
    finally:
        handle.remove()
    encoded = {p: prompts.conditioning(pipe, [p], [""]) for p in ("a red circle", "a blue circle")}

    def which(z, pooled):
        for p, e in encoded.items():
            if torch.allclose(z, e["prompt_embeds"][0], atol=1e-4) and torch.allclose(pooled, e["pooled_prompt_embeds"][0],
                                                                                       atol=1e-4):
                return p
    # 3 steps: when = int(1.5) = 1, so steps 0 and 1 read "red", step 2 "blue"
    assert [which(*c) for c in calls] == ["a red circle", "a red circle", "a blue circle"]
