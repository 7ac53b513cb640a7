"""Textual-inversion embeddings from models/embeddings, used by name in a prompt: an embedding whose vectors
are the token embeddings of "red" must draw exactly what the word "red" draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tinymodels import save_diffusers

from sdserve import core
from sdserve.engine.models import ModelRegistry
from sdserve.engine.pipeline import Engine
from sdserve.schema import GenerationRequest


@pytest.fixture(scope="module")
def emb_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb-models")
    pipe = save_diffusers(root / "tiny")
    ids = pipe.tokenizer("red", add_special_tokens=False)["input_ids"]
    vectors = pipe.text_encoder.get_input_embeddings().weight[ids].detach().clone()
    folder = root / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors}, str(folder / "redword.safetensors"))  # A1111's layout
    save_file({"<colour>": vectors.clone()}, str(folder / "colourword.safetensors"))  # diffusers' layout
    save_file({"emb_params": torch.zeros(2, 999)}, str(folder / "wide.safetensors"))  # another model's width
    save_file({"clip_l": vectors.clone(), "clip_g": torch.zeros(3, 1280)}, str(folder / "xl.safetensors"))
    return root


@pytest.fixture(scope="module")
def emb_engine(emb_models, tmp_path_factory):
    return Engine(ModelRegistry(emb_models, tmp_path_factory.mktemp("emb-data"), extra=["tiny"], device="cpu"))


def pixels(engine, prompt):
    (queued,), _ = core.inline_inputs([GenerationRequest(prompt=prompt, seed=8, steps=3)])
    return engine.run([queued])[0][0].pixels


def test_an_embedding_by_name_is_its_vectors(emb_engine):
    red = pixels(emb_engine, "a red circle")
    assert np.abs(pixels(emb_engine, "a redword circle") - red).max() <= 1e-5
    assert np.abs(pixels(emb_engine, "a colourword circle") - red).max() <= 1e-5
    assert np.abs(pixels(emb_engine, "a (redword:1.4) circle") - red).max() > 1e-3  # emphasis applies to it too
    assert np.abs(pixels(emb_engine, "a circle") - red).max() > 1e-3


def test_misfit_embeddings_are_skipped_not_fatal(emb_engine):
    pixels(emb_engine, "a wide circle")
    state = emb_engine.registry.load(None).adapters
    assert set(state.embeddings) == {"redword", "colourword"}
    assert "999-wide" in state.skipped["wide"] and "SDXL" in state.skipped["xl"]


def test_a1111_lists_embeddings(emb_models, servers):
    proc = servers(emb_models, "emb-server", "--model", "tiny")
    with proc.client() as c:
        listed = c.get("/sdapi/v1/embeddings").json()
        assert listed["loaded"]["redword"]["vectors"] == 3 and listed["loaded"]["redword"]["shape"] == 32
        assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a redword circle", "steps": 2, "seed": 1})
        assert r.status_code == 200
