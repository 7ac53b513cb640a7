"""LoRA: A1111's prompt tags and the native field in one canonical form, the files in models/Lora (kohya and
diffusers keys), their effect on the tiny engine's pixels, and the A1111 routes through webuiapi unmodified."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tolerance
import torch
import webuiapi
from server import wait_for
from tinymodels import lora_factors, save_diffusers, save_lora

from sdserve import addons, core, loras
from sdserve.engine.models import ModelRegistry
from sdserve.engine.pipeline import Engine, InvalidRequestError, batch_key
from sdserve.loras import LoraRef, LoraTagError, split_prompt
from sdserve.schema import GenerationRequest, JobRequest


# ---------------------------------------------------------------- the canonical form (pure)
def test_tags_leave_the_prompt_and_become_references():
    text, refs = split_prompt("a <lora:ink:0.8> cat, <lora:paper>  at night")
    assert text == "a cat, at night"
    assert refs == [LoraRef(name="ink", weight=0.8), LoraRef(name="paper", weight=1.0)]
    assert split_prompt("no tags here  (kept as is)") == ("no tags here  (kept as is)", [])


def test_canonical_merges_names_drops_zero_and_sorts():
    refs = [LoraRef(name="b", weight=0.5), LoraRef(name="a", weight=1), LoraRef(name="b", weight=0.25),
            LoraRef(name="z", weight=0)]
    assert loras.canonical(refs) == [LoraRef(name="a", weight=1.0), LoraRef(name="b", weight=0.75)]
    assert loras.tags(loras.canonical(refs)) == "<lora:a:1> <lora:b:0.75>"


@pytest.mark.parametrize("prompt", ["<lora:x:strong>", "<lora:x:0.5:1>"])
def test_bad_tags_are_refused_with_the_reason(prompt):
    with pytest.raises(LoraTagError, match="lora:x"):
        split_prompt(prompt)


def test_the_job_carries_one_form_whichever_way_the_client_said_it():
    tagged = core.job_request(GenerationRequest(prompt="a cat <lora:ink:0.5>", seed=1), model="m", keys={},
                              init_size=None)
    native = core.job_request(GenerationRequest(prompt="a cat", loras=[{"name": "ink", "weight": 0.5}], seed=1),
                              model="m", keys={}, init_size=None)
    assert tagged == native and tagged.prompt == "a cat" and tagged.loras == [LoraRef(name="ink", weight=0.5)]
    assert batch_key(tagged) != batch_key(JobRequest(prompt="a cat", seed=1, model="m"))


# ---------------------------------------------------------------- files
@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    """A models folder: the tiny model, and LoRAs for it in both key formats."""
    root = tmp_path_factory.mktemp("lora-models")
    pipe = save_diffusers(root / "tiny")
    a, b = lora_factors(pipe, seed=1), lora_factors(pipe, seed=2)
    folder = root / "Lora"
    save_lora(a, folder / "ink.safetensors", "kohya", {"ss_output_name": "ink_v2", "ss_tag_frequency": '{"x": {"ink": 3}}'})
    save_lora(a, folder / "ink-diffusers" / "pytorch_lora_weights.safetensors", "diffusers")
    save_lora(b, folder / "styles" / "paper.safetensors", "diffusers")
    # a and b in one file of twice the rank: its update is the sum of theirs.
    both = {k: (torch.cat([a[k][0], b[k][0]]), torch.cat([a[k][1], b[k][1]], dim=1)) for k in a}
    save_lora(both, folder / "ink+paper.safetensors", "diffusers")
    text_only = {k: v for k, v in a.items() if k.startswith("text_encoder.")}
    save_lora(text_only, folder / "text-only.safetensors", "kohya")
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return root


def test_catalog_lists_both_formats_with_metadata(lora_models):
    files = {f.name: f for f in addons.loras(lora_models).list()}
    assert set(files) == {"ink", "ink-diffusers", "paper", "ink+paper", "text-only"}  # broken: not listed
    ink = files["ink"]
    assert ink.alias == "ink_v2" and ink.metadata["ss_tag_frequency"] == {"x": {"ink": 3}}
    assert ink.path.name == "ink.safetensors"


@pytest.fixture(scope="module")
def lora_engine(lora_models, tmp_path_factory):
    return Engine(ModelRegistry(lora_models, tmp_path_factory.mktemp("lora-data"), extra=["tiny"], device="cpu"))


def pixels(engine, prompt="a red circle", **fields):
    (queued,), _ = core.inline_inputs([GenerationRequest(prompt=prompt, seed=3, steps=4, **fields)])
    return engine.run([queued])[0][0]


def diff(a, b) -> float:
    return float(np.abs(a.pixels - b.pixels).max())


def test_a_lora_changes_the_picture_and_weight_zero_does_not(lora_engine):
    plain = pixels(lora_engine)
    assert diff(pixels(lora_engine, "a red circle <lora:ink:1>"), plain) > 1e-3
    assert diff(pixels(lora_engine, "a red circle <lora:ink:0>"), plain) == 0
    assert diff(pixels(lora_engine), plain) == 0  # after a LoRA batch, none is active again


def test_weights_scale_the_update(lora_engine):
    plain, half, full = (pixels(lora_engine, f"a red circle <lora:ink:{w}>") for w in (0, 0.5, 1))
    assert 0 < diff(half, plain) < diff(full, plain)


def test_kohya_and_diffusers_files_of_the_same_weights_draw_the_same(lora_engine):
    assert diff(pixels(lora_engine, "a red circle <lora:ink:0.8>"),
                pixels(lora_engine, "a red circle <lora:ink-diffusers:0.8>")) <= 1e-5


def test_two_loras_at_once_equal_their_combined_update(lora_engine):
    together = pixels(lora_engine, "a red circle <lora:ink:1> <lora:paper:1>")
    combined = pixels(lora_engine, "a red circle", loras=[{"name": "ink+paper"}])
    assert diff(together, combined) <= tolerance.FLOAT
    assert diff(together, pixels(lora_engine, "a red circle <lora:ink:1>")) > 1e-3


def test_a_text_encoder_lora_reaches_the_encoder(lora_engine):
    assert diff(pixels(lora_engine, "a red circle <lora:text-only:1>"), pixels(lora_engine)) > 1e-3


def test_alias_finds_the_file_and_infotext_keeps_the_tag(lora_engine):
    image = pixels(lora_engine, "a red circle <lora:ink_v2:0.7>")
    assert diff(image, pixels(lora_engine, "a red circle <lora:ink:0.7>")) == 0
    assert image.infotext.splitlines()[0] == "a red circle <lora:ink_v2:0.7>"


def test_a_lora_batch_runs_its_unet_on_torch_and_says_so(lora_engine, lora_models, tmp_path):
    """The compiled UNet holds the base weights: a batch with LoRAs runs the torch UNet (engine/accel.py), and draws
    what plain torch draws."""
    plain = Engine(ModelRegistry(lora_models, tmp_path, extra=["tiny"], device="cpu", optimize=["none"]))
    with_lora = pixels(lora_engine, "a red circle <lora:ink:1>")
    assert (with_lora.route.engine, with_lora.route.fallback) == ("torch", "lora")
    assert diff(with_lora, pixels(plain, "a red circle <lora:ink:1>")) <= tolerance.FLOAT
    assert (pixels(lora_engine).route.engine, pixels(lora_engine).route.fallback) == ("openvino", None)


def test_unknown_or_unusable_lora_is_the_clients_error(lora_engine):
    with pytest.raises(InvalidRequestError, match="unknown LoRA 'nope'"):
        pixels(lora_engine, "<lora:nope:1>")
    with pytest.raises(InvalidRequestError, match="broken"):
        pixels(lora_engine, "<lora:broken:1>")
    assert diff(pixels(lora_engine), pixels(lora_engine)) == 0  # and the engine still works


def test_a_new_file_is_found_without_a_refresh(lora_engine, lora_models):
    shutil.copy(lora_models / "Lora" / "ink.safetensors", lora_models / "Lora" / "ink-copy.safetensors")
    assert diff(pixels(lora_engine, "<lora:ink-copy:1> a red circle"), pixels(lora_engine, "<lora:ink:1> a red circle")) == 0


# ---------------------------------------------------------------- through the server, A1111's client unmodified
@pytest.fixture(scope="module")
def lora_server(lora_models, module_servers):
    return module_servers(lora_models, "lora-server", "--model", "tiny")


def test_webuiapi_lora_tag_and_routes(lora_server):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=lora_server.port, sampler="Euler a", steps=3)
    listed = {entry["name"]: entry for entry in api.get_loras()}
    assert listed["ink"]["alias"] == "ink_v2" and "paper" in listed
    with lora_server.client() as c:
        assert c.post("/sdapi/v1/refresh-loras").status_code == 200
    plain = api.txt2img(prompt="a red circle", seed=5, width=64, height=64)
    with_lora = api.txt2img(prompt="<lora:ink:0.8> a red circle", seed=5, width=64, height=64)
    zero = api.txt2img(prompt="<lora:ink:0> a red circle", seed=5, width=64, height=64)
    as_array = lambda r: np.asarray(r.image, dtype=np.int16)  # noqa: E731
    assert np.abs(as_array(with_lora) - as_array(plain)).max() > 2
    assert np.array_equal(as_array(zero), as_array(plain))
    assert "<lora:ink:0.8>" in with_lora.info["infotexts"][0]
    assert "ignored_fields" not in with_lora.info or not with_lora.info["ignored_fields"]


def test_native_field_and_unknown_name(lora_server):
    with lora_server.client() as c:
        assert {entry["name"] for entry in c.get("/api/v1/loras").json()} >= {"ink", "paper"}
        job = c.post("/api/v1/jobs", json={"prompt": "a cat <lora:paper:0.5>", "loras": [{"name": "ink"}],
                                           "steps": 2}).json()
        assert job["request"]["prompt"] == "a cat"
        assert job["request"]["loras"] == [{"name": "ink", "weight": 1.0}, {"name": "paper", "weight": 0.5}]
        done = wait_for(c, job["id"])
        assert [(i["engine"], i["fallback"]) for i in done["images"]] == [("torch", "lora")]
        assert 'sdserve_engine_fallbacks_total{reason="lora"}' in c.get("/metrics").text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "<lora:missing:1> x", "steps": 2})
        assert r.status_code == 422 and "unknown LoRA 'missing'" in r.json()["detail"]
        r = c.post("/api/v1/jobs", json={"prompt": "<lora:x:loud>"})
        assert r.status_code == 422 and "weight must be a number" in r.text
