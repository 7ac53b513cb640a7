"""What a step preview costs (issue 29: at most 5% of a step's time at batch 16). Writes
bench/results/previews-<machine>.json and .png.

One batch of 16 images of the demo model (16 jobs), 20 steps, with no previews and with a preview of every job at
every step (the most a client can ask: `preview_every: 1`) and every 4 (the web UI's rate at 20 steps), in
rotating order, 12 times each. Two measures:

- direct: the time spent drawing and encoding previews (the projection of 16 latents to RGB, the pictures, and
  their JPEGs, which the runner's progress writer makes on its own thread: on 2 cores that still takes CPU from
  the UNet, so it is counted), per step, against the median step of the runs without previews;
- end to end: the median step with previews against without (the machine's noise is larger than the cost here:
  read it as a bound).

    make bench BENCH_ARGS=previews      (about 5 minutes)
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, machine  # noqa: E402


def run_once(engine, every: int, batch: int, steps: int) -> tuple[list[float], list[float]]:
    """(seconds of each step, seconds of each step's preview work)."""
    from sdserve.engine import previews
    from sdserve.schema import JobRequest

    requests = [JobRequest(prompt=f"a red circle on a blue background {i}", model="demo", steps=steps, seed=i,
                           preview_every=every) for i in range(batch)]
    marks: list[float] = []
    spent: list[float] = []
    original = engine._previewer

    def timed_previewer(pipe, rows):
        show = original(pipe, rows)
        if show is None:
            return None

        def timed(step, latents):
            started = time.perf_counter()
            show(step, latents)
            spent.append(time.perf_counter() - started)

        return timed

    # As the runner does: the pictures are handed over, and encoded on a thread of their own (its progress
    # writer); that thread's time is counted with the drawing.
    handed: queue.Queue = queue.Queue()
    encoded: list[float] = []

    def encoder() -> None:
        while (pictures := handed.get()) is not None:
            started = time.perf_counter()
            for picture in pictures.values():
                previews.encode(picture)
            encoded.append(time.perf_counter() - started)

    thread = threading.Thread(target=encoder)
    thread.start()
    engine._previewer = timed_previewer
    try:
        marks.append(time.perf_counter())
        engine.run(requests, on_step=lambda *_: marks.append(time.perf_counter()), on_preview=lambda s, p: handed.put(p))
    finally:
        engine._previewer = original
        handed.put(None)
        thread.join()
    # per step: drawing + encoding (pairs of entries); from the 2nd step on: the 1st holds the text encoder
    work = [a + b for a, b in zip(spent, encoded)]
    return [b - a for a, b in zip(marks[1:], marks[2:])], work


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--every", type=int, default=4, help="the second rate measured (the web UI's at 20 steps)")
    parser.add_argument("--optimize", default="", help="--optimize for the engine (default: auto)")
    args = parser.parse_args(argv)

    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine

    root = Path(tempfile.mkdtemp(prefix="sdserve-previews-"))
    registry = ModelRegistry(root / "models", root / "data", extra=["demo"], device="cpu",
                             optimize=[o for o in args.optimize.split(",") if o], compile_cache=root / "compiled")
    engine = Engine(registry)
    speedups = registry.load("demo").speedups.engine
    modes = (0, 1, args.every)  # none, a preview every step, the web UI's rate at 20 steps
    for every in modes:  # warm-up: graphs, the fitted projection
        run_once(engine, every, args.batch, args.steps)
    steps: dict[int, list[float]] = {every: [] for every in modes}
    runs: dict[int, list[float]] = {every: [] for every in modes}
    spent: list[float] = []
    for repeat in range(args.repeats):  # the order rotates, so drift on a noisy machine hits each alike
        for every in modes[repeat % 3:] + modes[:repeat % 3]:
            measured, work = run_once(engine, every, args.batch, args.steps)
            steps[every] += measured
            runs[every].append(sum(measured))
            if every == 1:
                spent += work
    step_s = {every: statistics.median(v) for every, v in steps.items()}
    run_s = {every: statistics.median(v) for every, v in runs.items()}
    preview_s = statistics.median(spent)
    results = {
        "machine": machine("cpu"), "engine": speedups, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "step_ms": {f"every {k}" if k else "none": v * 1000 for k, v in step_s.items()},
        "preview_ms": preview_s * 1000, "preview_over_step": preview_s / step_s[0],
        "step_with_over_without": step_s[1] / step_s[0],
        "run_over_none": {f"every {k}": run_s[k] / run_s[0] for k in modes[1:]},
        "step_s": {f"every {k}" if k else "none": v for k, v in steps.items()}, "preview_s": spent,
    }
    name = results["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    out = RESULTS / f"previews-{name}.json"
    out.write_text(json.dumps(results, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.boxplot([[v * 1000 for v in steps[0]], [v * 1000 for v in steps[1]], [v * 1000 for v in spent]],
               tick_labels=["step", "step with previews", "preview work"])
    ax.set_ylabel(f"ms (batch {args.batch}, demo 64x64)")
    ax.set_title(f"a preview of all {args.batch} jobs: {results['preview_over_step']:.1%} of a step ({speedups})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"step {step_s[0] * 1000:.1f} ms at batch {args.batch} ({speedups}); previews of all {args.batch} "
          f"jobs: {preview_s * 1000:.2f} ms = {results['preview_over_step']:.1%} of a step; a step with them / "
          f"without: {results['step_with_over_without']:.3f}; a whole run / without, previews every 1 and every "
          f"{args.every} steps: " + ", ".join(f"{v:.3f}" for v in results["run_over_none"].values()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
