"""What the embedded demo model draws, and how fast: the README's grid and figures (`make bench-demo`).

- adherence: 50 seeded prompts in the full grammar (demo_data.test_scenes), read back with demo_data.read, at
  CFG 7 and CFG 1: the fraction with the prompted colour, shape, region and background (tests/test_demo_model.py
  holds the bars);
- guidance: the prompted colour's hit rate on colour-only prompts ("a red shape"), CFG 7 against CFG 1;
- negative prompt: the red share of "a large red circle ..." without and with the negative prompt "red";
- speed: a 20-step image at the native 64x64, batch 1, through the engine (median of 15 after a warm-up);
- a grid of prompts and outputs, docs/demo-grid.png.

Writes bench/results/demo-model.json and the grid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

GRID_PROMPTS = [
    "a red circle on a blue background",
    "a large yellow star in the middle on a purple background",
    "a small green triangle at the top",
    "a square, orange, on the left",
    "white background, a black cross at the bottom",
    "a large pink circle on the right on a green background",
    "a blue triangle",
    "a small grey star on the left on a yellow background",
]


def engine():
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine

    work = Path(tempfile.mkdtemp(prefix="sdserve-demo-bench-"))
    return Engine(ModelRegistry(work / "models", work, extra=["demo"], device="cpu"))


def generate(eng, prompts, seeds, **fields):
    from sdserve.core import inline_inputs
    from sdserve.schema import GenerationRequest

    queued, inputs = inline_inputs([GenerationRequest(prompt=p, seed=s, **fields) for p, s in zip(prompts, seeds)])
    return [images[0].image for images in eng.run(queued, inputs=inputs)]


def adherence(eng) -> dict:
    from sdserve.demo import data as demo_data

    scenes = demo_data.test_scenes(50)
    prompts = [demo_data.prompt(s) for s in scenes]
    seeds = list(range(1000, 1050))
    out = {}
    for cfg in (7.0, 1.0):
        readings = [demo_data.read(im) for im in generate(eng, prompts, seeds, cfg_scale=cfg)]
        out[f"cfg{cfg:g}"] = demo_data.adherence(scenes, readings)
    return out


def guidance(eng) -> dict:
    """Colour adherence on colour-only prompts ("a red shape", 50), at CFG 7 and CFG 1."""
    from sdserve.demo import data as demo_data

    prompts, seeds, colours = demo_data.colour_only_prompts()
    out = {}
    for cfg in (7.0, 1.0):
        images = generate(eng, prompts, seeds, cfg_scale=cfg)
        out[f"cfg{cfg:g}"] = sum(demo_data.read(im).colour == c for im, c in zip(images, colours)) / len(colours)
    return out


def negative(eng) -> dict:
    """The red share of the negative-prompt probe's pictures, without and with the negative prompt "red"."""
    from sdserve.demo import data as demo_data

    prompt, negative_prompt, seeds = demo_data.NEGATIVE_PROBE
    share = {}
    for name, fields in (("without", {}), ("with", {"negative_prompt": negative_prompt})):
        images = generate(eng, [prompt] * len(seeds), seeds, **fields)
        share[name] = round(statistics.fmean(demo_data.read(im).share["red"] for im in images), 4)
    return {**share, "ratio": round(share["with"] / share["without"], 3)}


def speed(eng, repeats: int = 15) -> dict:
    generate(eng, ["a red circle"], [0])
    times = []
    for i in range(repeats):
        started = time.perf_counter()
        generate(eng, ["a red circle on a blue background"], [i])
        times.append(time.perf_counter() - started)
    return {"steps": 20, "size": 64, "batch": 1, "median_s": round(statistics.median(times), 3),
            "min_s": round(min(times), 3), "max_s": round(max(times), 3)}


def grid(eng, path: Path, seeds=(1, 2, 3, 4)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(GRID_PROMPTS), len(seeds), figsize=(1.3 * len(seeds) + 3.6, 1.3 * len(GRID_PROMPTS)))
    for row, prompt in enumerate(GRID_PROMPTS):
        images = generate(eng, [prompt] * len(seeds), list(seeds))
        for col, image in enumerate(images):
            ax = axes[row][col]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=8)
            if row == 0:
                ax.set_title(f"seed {seeds[col]}", fontsize=8)
    fig.suptitle("sdserve's demo model: 64x64, 20 steps of DPM++ 2M (SGM Uniform), CFG 7", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo-model.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "demo-grid.png")
    args = parser.parse_args()
    import torch

    from sdserve.engine import demo

    eng = engine()
    report = json.loads((demo.DEMO_PATH / demo.MARKER).read_text())
    size = sum(p.stat().st_size for p in demo.DEMO_PATH.rglob("*") if p.is_file())
    results = {"command": " ".join(["bench/demo_model.py", *sys.argv[1:]]), "torch": torch.__version__,
               "model_bytes": size, "training": report, "speed": speed(eng), "adherence": adherence(eng),
               "guidance_colour_only": guidance(eng), "negative_prompt_red_share": negative(eng)}
    grid(eng, args.grid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
