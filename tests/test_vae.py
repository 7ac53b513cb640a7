"""VAE choice: files in models/VAE (diffusers keys, A1111's original keys, a diffusers folder) decode the same
latents differently from the model's own VAE; A1111's sd_vae and the native `vae` field pick one."""

from __future__ import annotations

import numpy as np
import pytest
import webuiapi
from safetensors.torch import save_file
from tinymodels import build_tiny_pipeline, save_diffusers, vae_to_ldm

from sdserve import core
from sdserve.engine.models import ModelRegistry
from sdserve.engine.pipeline import Engine, InvalidRequestError
from sdserve.schema import GenerationRequest


@pytest.fixture(scope="module")
def vae_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-models")
    save_diffusers(root / "tiny")
    other = build_tiny_pipeline(seed=5).vae
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    folder = root / "VAE"
    folder.mkdir()
    save_file(state, str(folder / "second.safetensors"))
    save_file({k.removeprefix("first_stage_model."): v.contiguous()
               for k, v in vae_to_ldm(state, other.config).items()}, str(folder / "second-ldm.safetensors"))
    other.save_pretrained(folder / "second-folder", safe_serialization=True)
    narrow = {k: v for k, v in state.items() if not k.startswith("decoder.conv_out")}
    save_file(narrow, str(folder / "misfit.safetensors"))
    return root


@pytest.fixture(scope="module")
def vae_engine(vae_models, tmp_path_factory):
    return Engine(ModelRegistry(vae_models, tmp_path_factory.mktemp("vae-data"), extra=["tiny"], device="cpu"))


def image(engine, **fields):
    (queued,), _ = core.inline_inputs([GenerationRequest(prompt="a red circle", seed=4, steps=3, **fields)])
    return engine.run([queued])[0][0]


def test_a_chosen_vae_changes_the_decode_and_none_restores_the_models_own(vae_engine):
    own = image(vae_engine)
    second = image(vae_engine, vae="second")
    assert np.abs(second.pixels - own.pixels).max() > 1e-3
    assert "VAE: second" in second.infotext and "VAE:" not in own.infotext
    assert np.array_equal(image(vae_engine).pixels, own.pixels)


def test_every_file_form_of_the_same_weights_decodes_alike(vae_engine):
    second = image(vae_engine, vae="second.safetensors")  # A1111 names VAEs by file name
    for name in ("second-ldm", "second-folder"):
        assert np.abs(image(vae_engine, vae=name).pixels - second.pixels).max() <= 1e-5, name


def test_unknown_or_misfit_vae_is_the_clients_error(vae_engine):
    with pytest.raises(InvalidRequestError, match="unknown VAE 'nope'"):
        image(vae_engine, vae="nope")
    with pytest.raises(InvalidRequestError, match="does not fit"):
        image(vae_engine, vae="misfit")


def test_a1111_sd_vae_through_webuiapi(vae_models, servers):
    proc = servers(vae_models, "vae-server", "--model", "tiny")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=proc.port, sampler="Euler a", steps=3)
    names = {v["model_name"] for v in api.session.get(f"{proc.url}/sdapi/v1/sd-vae").json()}
    assert {"second.safetensors", "second-ldm.safetensors", "second-folder"} <= names
    own = api.txt2img(prompt="a red circle", seed=2, override_settings={"sd_vae": "Automatic"})
    chosen = api.txt2img(prompt="a red circle", seed=2, override_settings={"sd_vae": "second.safetensors"})
    diff = np.abs(np.asarray(own.image, dtype=np.int16) - np.asarray(chosen.image, dtype=np.int16)).max()
    assert diff > 2 and not chosen.info["ignored_fields"]
    api.set_options({"sd_vae": "second.safetensors"})  # the saved option applies to later calls
    saved = api.txt2img(prompt="a red circle", seed=2)
    assert np.array_equal(np.asarray(saved.image), np.asarray(chosen.image))
    r = api.session.post(f"{proc.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2,
                                                               "override_settings": {"sd_vae": "gone"}})
    assert r.status_code == 422 and "unknown VAE 'gone'" in r.json()["detail"]
