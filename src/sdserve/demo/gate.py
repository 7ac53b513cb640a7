"""The quality gate a speed-up must pass before `--optimize auto` may choose it (engine/accel.py): on the demo model's
50 seeded scenes, at CFG 7, its pictures against plain torch fp32's for the same seeds:

- colour, shape, region and background read back as often as torch's, within 0.02 each;
- mean PSNR at least 35 dB.

tests/test_accel.py holds every path `auto` takes on the machine to it; bench/accel.py prints the figures of every
path, pixel-changing ones included, beside their speed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdserve.demo import data as demo_data

MAX_ADHERENCE_DROP = 0.02
MIN_PSNR_DB = 35.0
PARTS = ("colour", "shape", "region", "background")
SEEDS = range(1000, 1050)


def draw(engine: Any, scenes: list[demo_data.Scene] | None = None) -> list[Any]:
    """The 50 scenes, one image each, in one batch (GeneratedImage: the picture and its float pixels)."""
    from sdserve.schema import JobRequest

    scenes = scenes or demo_data.test_scenes(len(SEEDS))
    requests = [JobRequest(prompt=demo_data.prompt(s), seed=seed, cfg_scale=7.0) for s, seed in zip(scenes, SEEDS)]
    return [images[0] for images in engine.run(requests)]


def psnr(reference: Any, candidate: Any) -> float:
    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(candidate, np.float64)) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))  # identical pictures: 120 dB, not infinity (JSON has no inf)


def measure(reference: list[Any], candidate: list[Any]) -> dict[str, Any]:
    """The gate's figures for `candidate` against `reference` (both from `draw`), and whether it passes."""
    scenes = demo_data.test_scenes(len(SEEDS))

    def figures(generated: list[Any]) -> dict[str, float]:
        return demo_data.adherence(scenes, [demo_data.read(g.image) for g in generated])

    ref, got = figures(reference), figures(candidate)
    drops = {part: round(ref[part] - got[part], 4) for part in PARTS}
    mean_psnr = float(np.mean([psnr(a.pixels, b.pixels) for a, b in zip(reference, candidate)]))
    return {
        "adherence": got, "reference_adherence": ref, "drop": drops, "psnr_db": round(mean_psnr, 2),
        "passed": all(drop <= MAX_ADHERENCE_DROP for drop in drops.values()) and mean_psnr >= MIN_PSNR_DB,
    }

