"""How far a seed's image moves when it shares a batch (issue 24): the same job run alone and in batches of
2..16 beside other jobs, on this CPU, with the demo model. Writes bench/results/seeds-<machine>.json and .png.

A batched UNet pass computes each row with the same arithmetic, but the kernels a CPU library picks (and how it
blocks and sums a matrix product) depend on the batch's shape, so float results can differ in their last bits,
and after 8-bit rounding a few pixels by one level. This measures how much, per batch size:
max and mean absolute pixel difference (0..255) and the share of bytes that differ, against the job alone.

    make bench BENCH_ARGS=seeds        # or: .venv/bin/python bench/seeds.py [--sizes 1,2,4,8,16] [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, machine  # noqa: E402


def measure(sizes: list[int], seeds: int, steps: int, model: str) -> dict:
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine
    from sdserve.schema import JobRequest

    work = Path(tempfile.mkdtemp(prefix="sdserve-seeds-"))
    engine = Engine(ModelRegistry(work / "models", work, extra=[model], device="cpu"))
    name = engine.registry.info(model).name

    def request(prompt: str, seed: int) -> JobRequest:
        return JobRequest(prompt=prompt, seed=seed, steps=steps, model=name)

    def pixels(requests: list[JobRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(8-bit pixels, float pixels before rounding) of each request's image."""
        return [(np.asarray(images[0].image, dtype=np.int16), images[0].pixels) for images in engine.run(requests)]

    prompts = ["a red circle on a blue background", "a green square on the left", "a yellow triangle",
               "a purple star on a white background"]
    rows = []
    for size in sizes:
        diffs, floats, differing, total, started = [], [], 0, 0, time.perf_counter()
        for s in range(seeds):
            probe = request(prompts[s % len(prompts)], 1000 + s)
            alone = pixels([probe])[0]
            # The probe at every position of a batch of `size`, its companions other prompts and seeds.
            for position in range(size if size > 1 else 1):
                companions = [request(prompts[(s + k + 1) % len(prompts)], 5000 + 31 * s + k) for k in range(size - 1)]
                batch = companions[:position] + [probe] + companions[position:]
                got = pixels(batch)[position]
                diff = np.abs(got[0] - alone[0])
                diffs.append(diff)
                floats.append(float(np.abs(got[1] - alone[1]).max()))
                differing += int((diff > 0).sum())
                total += diff.size
                if size > 4 and position >= 1:  # positions past the first say nothing new on big batches
                    break
        stacked = np.stack(diffs)
        rows.append({"batch": size, "max_abs": int(stacked.max()), "mean_abs": float(stacked.mean()),
                     "max_abs_float": max(floats),
                     "share_differing": differing / total, "samples": len(diffs),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(f"  batch {size:2d}: max {rows[-1]['max_abs']}, mean {rows[-1]['mean_abs']:.4f}, float max "
              f"{rows[-1]['max_abs_float']:.2e}, "
              f"bytes differing {rows[-1]['share_differing']:.2%} ({len(diffs)} images)", flush=True)
    return {"model": name, "steps": steps, "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot([r["batch"] for r in rows], [r["max_abs"] for r in rows], "o-", label="max |diff| (0..255)")
    ax.plot([r["batch"] for r in rows], [r["mean_abs"] for r in rows], "s-", label="mean |diff|")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size the seed ran in")
    ax.set_ylabel("pixel difference vs. alone")
    ax.legend(fontsize=8)
    ax.set_title(f"a seed's image in a batch vs. alone, {result['machine']['label']}\n{result['model']}, "
                 f"{result['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,2,3,4,8,16")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", default="demo")
    args = parser.parse_args(argv)
    result = {"machine": machine("cpu"), "command": " ".join(sys.argv),
              **measure([int(s) for s in args.sizes.split(",")], args.seeds, args.steps, args.model)}
    name = "seeds-" + re.sub(r"[^a-z0-9]+", "-", result["machine"]["label"].lower()).strip("-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
