import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdserve.engine.models import ModelError, ModelRegistry, UnknownModelError
from sdserve.engine.pipeline import Engine
from sdserve.schema import JobRequest


def pixels(image):
    return torch.from_numpy(np.asarray(image).copy())


def test_registry_finds_folder_and_single_file(registry, models_dir):
    found = {m.name: m for m in registry.refresh()}
    assert found["tiny"].kind == "diffusers"
    assert found["tinyfile"].kind == "single-file"
    assert found["tinyfile"].arch == "sd1"
    assert found["tinyfile"].size_bytes == (models_dir / "tinyfile.safetensors").stat().st_size
    assert "configs" not in found  # the config folder for single files is not a model


def test_hash_is_a1111_short_sha256(registry, models_dir):
    info = registry.info("tinyfile")
    expected = hashlib.sha256((models_dir / "tinyfile.safetensors").read_bytes()).hexdigest()
    assert registry.sha256(info) == expected
    assert registry.short_hash(info) == expected[:10]
    # A1111 clients name checkpoints by title "file [hash]", filename, or hash.
    assert registry.info(f"tinyfile.safetensors [{expected[:10]}]").name == "tinyfile"
    assert registry.info(expected[:10]).name == "tinyfile"


def test_single_file_loads_same_weights_as_folder(engine):
    request = dict(prompt="a red circle", seed=3, steps=3, width=64, height=64)
    folder = engine.run([JobRequest(model="tiny", **request)])[0][0].image
    single = engine.run([JobRequest(model="tinyfile", **request)])[0][0].image
    assert torch.equal(pixels(folder), pixels(single))


def test_modes_share_one_set_of_weights(registry):
    model = registry.load("tiny")
    unets = {id(p.unet) for p in model.pipelines.values()}
    assert set(model.pipelines) == {"txt2img", "img2img", "inpaint"}
    assert len(unets) == 1


def test_lru_eviction(models_dir, data_dir):
    registry = ModelRegistry(models_dir, data_dir, extra=[str(models_dir / "tiny")], device="cpu", max_loaded=1)
    registry.load("tiny")
    registry.load("tinyfile")
    assert registry.loaded() == ["tinyfile"]
    registry.load("tiny")
    assert registry.loaded() == ["tiny"]


@pytest.fixture()
def pickle_dir(tmp_path, models_dir):
    # Same weights as tinyfile, saved the unsafe way.
    torch.save({"state_dict": load_file(models_dir / "tinyfile.safetensors")}, tmp_path / "old.ckpt")
    (tmp_path / "configs").symlink_to(models_dir / "configs")
    return tmp_path


def test_pickle_checkpoint_is_refused(pickle_dir, data_dir):
    registry = ModelRegistry(pickle_dir, data_dir, extra=[], device="cpu")
    assert registry.info("old").kind == "pickle"
    with pytest.raises(ModelError, match="pickle checkpoint.*--allow-pickle"):
        registry.load("old")


def test_pickle_checkpoint_loads_when_allowed(pickle_dir, data_dir, engine):
    registry = ModelRegistry(pickle_dir, data_dir, extra=[], device="cpu", allow_pickle=True)
    image = Engine(registry).run([JobRequest(model="old", prompt="a red circle", seed=3, steps=3)])[0][0].image
    reference = engine.run([JobRequest(model="tiny", prompt="a red circle", seed=3, steps=3)])[0][0].image
    assert torch.equal(pixels(image), pixels(reference))


def test_unknown_model_names_the_available_ones(registry):
    with pytest.raises(UnknownModelError, match="tinyfile"):
        registry.info("nope")


def test_hub_id_offline_fails_in_one_line(models_dir, data_dir, tmp_path):
    # A fresh process: huggingface_hub reads HF_HUB_OFFLINE at import (conftest sets it for the suite).
    code = (
        "from sdserve.engine.models import ModelRegistry, ModelError\n"
        f"r = ModelRegistry({str(tmp_path)!r}, {str(data_dir)!r}, extra=['someone/some-model'], device='cpu')\n"
        "try:\n    r.load('someone/some-model')\nexcept ModelError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    message = out.stdout.strip()
    assert "\n" not in message
    assert message.startswith("cannot download 'someone/some-model' from the Hugging Face hub: offline")


def test_demo_is_the_packaged_model_loaded_through_the_registry(tmp_path):
    from sdserve.engine.demo import DEMO_PATH

    registry = ModelRegistry(tmp_path / "none", tmp_path / "data", extra=["demo"], device="cpu")
    info = registry.info("demo")
    assert info.is_demo and info.kind == "demo" and info.path == DEMO_PATH
    weights = sorted(p.relative_to(DEMO_PATH) for p in DEMO_PATH.rglob("*") if p.suffix in (".safetensors", ".bin"))
    assert {str(p.parent) for p in weights} == {"text_encoder", "unet", "vae"}
    assert all(p.suffix == ".safetensors" for p in weights)
    assert info.size_bytes <= 20 * 2**20
    model = registry.load("demo")
    assert (model.default_width, model.default_height) == (64, 64)
    assert not (tmp_path / "data" / "models").exists()  # nothing is built at first run


def test_demo_training_is_deterministic_from_its_seed(tmp_path):
    from sdserve.demo.train import train

    small = dict(pictures=16, vae_steps=2, unet_steps=2, vae_batch=2, batch=4)
    train(tmp_path / "a", seed=5, **small)
    train(tmp_path / "b", seed=5, **small)
    train(tmp_path / "c", seed=6, **small)
    weights = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(weights) == 3
    for rel in weights:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / weights[0]).read_bytes() != (tmp_path / "c" / weights[0]).read_bytes()
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_optimizations_keep_the_pixels(models_dir, data_dir, engine, option):
    request = JobRequest(prompt="a red circle", seed=3, steps=3, width=64, height=64)
    reference = engine.run([request])[0][0].pixels
    registry = ModelRegistry(models_dir, data_dir, extra=[str(models_dir / "tiny")], device="cpu", optimize=[option])
    optimized = Engine(registry).run([request])[0][0].pixels
    assert np.abs(optimized - reference).max() < 1e-4
    pipelines = registry.load("tiny").pipelines
    assert len({id(p.unet) for p in pipelines.values()}) == 1  # every mode runs the optimized UNet


def test_unknown_optimization_is_refused(models_dir, data_dir):
    with pytest.raises(ModelError, match="valid: auto, none, openvino, channels_last"):
        ModelRegistry(models_dir, data_dir, optimize=["turbo"])
