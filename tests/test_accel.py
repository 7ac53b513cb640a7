"""--optimize (engine/accel.py): what `auto` means per device, the quality gate every path `auto` takes here passes on
the demo model, what a compiled graph cannot do runs on torch (and says so), and the compile cache (a restart reads
the graphs back instead of tracing again)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tolerance

from sdserve.demo import gate
from sdserve.engine import accel
from sdserve.engine.models import ModelRegistry
from sdserve.engine.pipeline import Engine
from sdserve.schema import JobRequest


# ---------------------------------------------------------------- the rule (pure)
def test_auto_is_chosen_per_device_and_what_cannot_run_is_refused():
    assert accel.resolve([], "cpu") == accel.resolve(["auto"], "cpu") == ["openvino"]  # openvino is a dependency
    assert accel.resolve(["auto"], "cuda") == ["channels_last"]
    assert accel.resolve(["auto"], "mps") == []
    assert accel.resolve(["none"], "cpu") == []
    assert accel.resolve(["compile", "freezing"], "cpu") == ["compile", "freezing"]  # given alone: no auto
    assert accel.resolve(["auto", "compile"], "cuda") == ["channels_last", "compile"]
    for options, device, words in (
        (["fast"], "cpu", "unknown optimization"),
        (["none", "openvino"], "cpu", "cannot be combined"),
        (["openvino"], "cuda", "runs on the CPU"),
        (["openvino", "compile"], "cpu", "choose one"),
        (["freezing"], "cpu", "option of compile"),
        (["cuda_graphs"], "cpu", "needs a CUDA device"),
    ):
        with pytest.raises(ValueError, match=words):
            accel.resolve(options, device)


def test_the_lora_and_controlnet_batches_are_the_ones_that_fall_back():
    assert accel.unet_fallback((), ()) is None
    assert accel.unet_fallback((("ink", 1.0),), ()) == "lora"
    assert accel.unet_fallback((), (("canny",),)) == "controlnet"


# ---------------------------------------------------------------- the gate, on the demo model
@pytest.fixture(scope="module")
def demo_engines(tmp_path_factory, compile_cache):
    def engine(optimize):
        return Engine(ModelRegistry(tmp_path_factory.mktemp("no-models"), tmp_path_factory.mktemp("data"),
                                    extra=["demo"], device="cpu", optimize=optimize, compile_cache=compile_cache))

    return engine(["none"]), engine(["auto"])


def test_every_path_auto_takes_here_passes_the_quality_gate(demo_engines):
    plain, auto = demo_engines
    reference, candidate = gate.draw(plain), gate.draw(auto)
    assert {g.route.engine for g in reference} == {"torch"}
    assert {g.route.engine for g in candidate} == {"openvino"} and {g.route.fallback for g in candidate} == {None}
    figures = gate.measure(reference, candidate)
    assert figures["passed"], figures
    # The gate has teeth: another seed's pictures (same prompts) are far below it.
    shifted = gate.measure(reference, reference[1:] + reference[:1])
    assert not shifted["passed"] and shifted["psnr_db"] < gate.MIN_PSNR_DB, shifted


# ---------------------------------------------------------------- fallbacks and shapes, on the tiny model
def _engines(models_dir, tmp_path, cache):
    return tuple(Engine(ModelRegistry(models_dir, tmp_path / name, extra=["tiny"], device="cpu", optimize=[name],
                                      compile_cache=cache)) for name in ("none", "auto"))


def _draw(engine, **fields):
    return engine.run([JobRequest(prompt="a red circle", seed=7, steps=3, **fields)])[0][0]


def test_sizes_the_graph_cannot_take_run_on_torch_and_draw_the_same(models_dir, tmp_path, compile_cache):
    plain, auto = _engines(models_dir, tmp_path, compile_cache)
    for size in ({}, {"width": 128, "height": 64}, {"width": 72, "height": 96}):  # 72x96: a latent of 9x12
        a, b = _draw(plain, **size), _draw(auto, **size)
        assert b.route.engine == "openvino" and b.image.size == a.image.size
        assert float(np.abs(a.pixels - b.pixels).max()) <= tolerance.FLOAT, size


def test_a_restart_reads_the_graphs_back_instead_of_tracing(models_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="sdserve.engine.accel"):
        first = _draw(_engines(models_dir, tmp_path / "a", cache)[1])
        traced = [r.message for r in caplog.records if "traced" in r.message]
        caplog.clear()
        again = _draw(_engines(models_dir, tmp_path / "b", cache)[1])
        assert not [r.message for r in caplog.records if "traced" in r.message]
    assert {m.split()[2] for m in traced} == {"unet", "vae-decoder", "vae-encoder"}
    assert float(np.abs(first.pixels - again.pixels).max()) <= tolerance.FLOAT
    assert len(list(cache.glob("*/unet/model.xml"))) == 1
