"""Fast by default: sdserve's engine paths side by side with the peers, in one run: `make bench BENCH_ARGS=accel`.

  sdserve-none       `--optimize none`: plain diffusers, eager torch fp32
  sdserve            its defaults (`--optimize auto`: OpenVINO fp32 on a CPU)
  sdserve-compile    `--optimize compile`: torch.compile (inductor) of the UNet
  sdserve-freezing   `--optimize compile,freezing`: the same with inductor's freezing
  litserve           LitServe as bench/peers.py runs it (plain diffusers, its batching on)
  fastapi-1t/-2t     the bare loop: FastAPI and one pipeline behind a lock, 1 or 2 torch threads

Each runs as a server (bench/peers.py's passes: the demo model, 64x64, 20 steps, DPM++ 2M, the same seeds), at 1 and 16
closed-loop clients; the passes alternate their order and the figures are medians. Also, per system: start-up to
/readyz 200 and to the first image, with an empty compile cache (the first pass) and with a warm one (the others;
`SDSERVE_COMPILE_CACHE` is the run's own folder); and per sdserve path, the quality gate (sdserve.demo.gate) against
plain torch, in this process. Writes bench/results/accel-<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers  # noqa: E402
from run import RESULTS, machine  # noqa: E402

SYSTEMS = ("sdserve-none", "sdserve", "sdserve-compile", "sdserve-freezing", "litserve", "fastapi-1t", "fastapi-2t")
PATHS = {"sdserve-none": ["none"], "sdserve": ["auto"], "sdserve-compile": ["compile"],
         "sdserve-freezing": ["compile", "freezing"]}


def quality(systems: list[str]) -> dict:
    """The gate's figures of each sdserve path against plain torch, and how long its first batch of 50 took."""
    from sdserve.demo import gate
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine

    work = Path(tempfile.mkdtemp(prefix="sdserve-accel-gate-"))
    drawn = {}
    try:
        for system in [s for s in systems if s in PATHS]:
            engine = Engine(ModelRegistry(work / "models", work / system, extra=["demo"], device="cpu",
                                          optimize=PATHS[system], compile_cache=work / "compiled"))
            started = time.perf_counter()
            drawn[system] = (gate.draw(engine), time.perf_counter() - started)
            print(f"  gate: {system} drew the 50 scenes in {drawn[system][1]:.1f} s", flush=True)
            del engine
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = drawn["sdserve-none"][0]
    return {system: {**gate.measure(reference, images), "first_batch_of_50_s": round(seconds, 2),
                     "engine": images[0].route.engine} for system, (images, seconds) in drawn.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--requests", type=int, default=24, help="requests per level, at least (4 per client)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    from sdserve.engine.demo import DEMO_PATH

    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    for name in peers.PACKAGES:
        if name in systems:
            peers.ensure_installed(name)
    results: dict = {"machine": machine("cpu"), "command": " ".join(["make bench BENCH_ARGS='accel", *(argv or [])])
                     + "'"}
    print(f"sdserve's engine paths beside the peers on {results['machine']['label']}", flush=True)
    cache = Path(tempfile.mkdtemp(prefix="sdserve-accel-cache-"))
    os.environ["SDSERVE_COMPILE_CACHE"] = str(cache)  # the servers' (inherited): empty for the first pass only
    one = argparse.Namespace(model=str(DEMO_PATH), levels=args.levels, requests=args.requests, size=64, steps=20)
    passes: dict[str, list[dict]] = {s: [] for s in systems}
    try:
        for number in range(args.passes):
            for system in systems if number % 2 == 0 else list(reversed(systems)):
                result = peers._pass(system, one)
                passes[system].append(result)
                print(f"  pass {number + 1}: {system}: ready in {result['ready_s']:.1f} s, " + ", ".join(
                    f"{lv['clients']} -> {lv['images_per_s']:.2f} img/s" for lv in result["levels"]), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    levels = [int(c) for c in args.levels.split(",")]

    def median_of(system: str, field: str) -> dict:
        return {str(c): statistics.median(p["levels"][i][field] for p in passes[system]) for i, c in enumerate(levels)}

    table = {s: median_of(s, "images_per_s") for s in systems}
    startup = {s: {"cold_ready_s": passes[s][0]["ready_s"], "cold_first_image_s": passes[s][0]["first_image_s"],
                   "warm_ready_s": statistics.median(p["ready_s"] for p in passes[s][1:] or passes[s]),
                   "warm_first_image_s": statistics.median(p["first_image_s"] for p in passes[s][1:] or passes[s])}
               for s in systems}
    peers_only = [s for s in systems if not s.startswith("sdserve")]
    ratios = {}
    for c in map(str, levels):
        ratios[c] = {f"{s}_vs_none": table[s][c] / table["sdserve-none"][c]
                     for s in systems if s.startswith("sdserve") and "sdserve-none" in table}
        if peers_only:
            best = max(peers_only, key=lambda s: table[s][c])
            ratios[c]["default_vs_best_peer"] = table["sdserve"][c] / table[best][c]
            ratios[c]["best_peer"] = best
    results["accel"] = {"settings": {"model": "demo", "size": 64, "steps": 20, "sampler": "DPM++ 2M",
                                     "levels": levels, "passes": args.passes},
                        "images_per_s": table, "p50_s": {s: median_of(s, "p50_s") for s in systems},
                        "startup": startup, "ratios": ratios, "passes": passes}
    print("  the quality gate, in this process", flush=True)
    results["gate"] = quality(systems)
    name = args.name or "accel-" + results["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / f"{name}.png")
    print_table(results)
    print(f"wrote {RESULTS / name}.json and .png")


def print_table(results: dict) -> None:
    r, gate = results["accel"], results["gate"]
    levels = r["settings"]["levels"]
    print("\n| system | " + " | ".join(f"{c} client(s) img/s | p50 s" for c in levels)
          + " | ready s (cold / warm) | first image s (cold / warm) | gate: PSNR dB, worst drop |")
    print("|---|" + "---|---|" * len(levels) + "---|---|---|")
    for system, row in r["images_per_s"].items():
        s = r["startup"][system]
        g = gate.get(system)
        verdict = (f"{g['psnr_db']:.1f}, {max(g['drop'].values()):+.2f} ({'pass' if g['passed'] else 'FAIL'})"
                   if g else "-")
        print(f"| {system} | " + " | ".join(f"{row[str(c)]:.2f} | {r['p50_s'][system][str(c)]:.3f}" for c in levels)
              + f" | {s['cold_ready_s']:.1f} / {s['warm_ready_s']:.1f}"
              + f" | {s['cold_first_image_s']:.1f} / {s['warm_first_image_s']:.1f} | {verdict} |")
    for c, ratio in r["ratios"].items():
        print(f"{c} client(s): " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in ratio.items()))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["accel"]
    levels = r["settings"]["levels"]
    systems = list(r["images_per_s"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        xs = [k + i * width for k in range(len(levels))]
        ax.bar(xs, [r["images_per_s"][system][str(c)] for c in levels], width, label=system)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(levels))], [f"{c} client(s)" for c in levels])
    ax.set_ylabel("images/s (higher is better)")
    ax.set_title(f"engine paths and peers, demo model 64x64, 20 steps: {results['machine']['label']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
