"""What one request may cost on this machine (issue 25): the work bound's unit, how fast a cancel lands, and what
a large VAE decode takes in memory, tiled or not. Writes bench/results/bounds-<machine>.json and .png.

- Speed: the demo model's megapixel-steps per second (images × width × height × steps / 1e6) at a few sizes, and so
  how long a request at the CPU default bound (bounds.DEFAULT_MAX_WORK) takes, against the 600 s job timeout.
- Cancel: a 512² job canceled mid-run, seconds from the cancel flag to the run's end (one denoising step).
- Memory: peak RSS of a fresh process decoding one image of each size with the VAE, whole and in tiles; and a
  batch of 4 decoded at once (diffusers' default) against one image at a time (what the engine does).

    make bench BENCH_ARGS=bounds
    make bench BENCH_ARGS='bounds --parts memory'   (only the memory figures, into the existing JSON)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, machine  # noqa: E402

DECODE = """
import sys, threading, time, torch
from sdserve.engine import pipeline
from sdserve.engine.models import ModelRegistry

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

registry = ModelRegistry(sys.argv[1], sys.argv[1], extra=["demo"], device="cpu")
vae = registry.load("demo").pipelines["txt2img"].vae
size, tiled, batch, sliced = int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5] == "1"
latents = torch.randn(batch, 4, size // 8, size // 8)
base, peak, done = rss(), [0.0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
with torch.inference_mode(), pipeline._decoding(vae, None, tiled):
    vae.use_slicing = sliced
    vae.decode(latents)
done.set()
sampler.join()
print(max(0.0, peak[0] - base))
"""


def speed(engine, name: str) -> list[dict]:
    from sdserve.schema import JobRequest

    rows = []
    for size, steps, n in ((64, 20, 8), (256, 10, 1), (512, 4, 1)):
        request = JobRequest(prompt="a red circle", seed=1, steps=steps, n=n, width=size, height=size, model=name)
        engine.run([request])  # warm: first-call costs out
        started = time.perf_counter()
        engine.run([request])
        seconds = time.perf_counter() - started
        work = n * size * size * steps / 1e6
        rows.append({"size": size, "steps": steps, "n": n, "seconds": round(seconds, 3), "mpx_steps": work,
                     "mpx_steps_per_s": round(work / seconds, 3)})
        print(f"  {n} x {size}² x {steps} steps: {seconds:.2f} s, {work / seconds:.2f} MPx-steps/s", flush=True)
    return rows


def cancel_latency(engine, name: str) -> dict:
    """A cancel flag set from another thread at a random moment mid-run; seconds until the run stops."""
    import random

    from sdserve.engine.pipeline import Cancelled
    from sdserve.schema import JobRequest

    flag = threading.Event()
    marks: dict[str, float] = {}
    steps_at: list[float] = []

    def on_step(step: int, steps: int) -> None:
        steps_at.append(time.perf_counter())
        if flag.is_set():
            raise Cancelled()

    def cancel_later() -> None:
        time.sleep(random.uniform(1.0, 2.0))
        marks["canceled"] = time.perf_counter()
        flag.set()

    request = JobRequest(prompt="a red circle", seed=1, steps=30, width=512, height=512, model=name)
    threading.Thread(target=cancel_later, daemon=True).start()
    try:
        engine.run([request], on_step=on_step)
    except Cancelled:
        pass
    ended = time.perf_counter()
    step_s = (steps_at[-1] - steps_at[0]) / max(1, len(steps_at) - 1)
    print(f"  cancel at 512²: stopped {ended - marks['canceled']:.2f} s after the flag (one step: {step_s:.2f} s)",
          flush=True)
    return {"size": 512, "seconds_after_cancel": round(ended - marks["canceled"], 3), "step_s": round(step_s, 3)}


def _decode_mb(work: Path, size: int, tiled: bool, batch: int = 1, sliced: bool = True) -> float | None:
    out = subprocess.run([sys.executable, "-c", DECODE, str(work), str(size), str(int(tiled)), str(batch),
                          str(int(sliced))], capture_output=True, text=True, timeout=900)
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def _mb(value: float | None) -> str:
    return "failed" if value is None else f"{value:.0f} MB"


def memory(work: Path) -> list[dict]:
    rows = []
    for size in (512, 1024, 2048):
        row = {"size": size, "whole_mb": _decode_mb(work, size, False), "tiled_mb": _decode_mb(work, size, True)}
        rows.append(row)
        print(f"  decode {size}²: whole {_mb(row['whole_mb'])}, tiled {_mb(row['tiled_mb'])} (peak RSS over the "
              "loaded model)", flush=True)
    return rows


def batch_memory(work: Path, batch: int = 4) -> list[dict]:
    rows = []
    for size in (512, 1024):
        row = {"size": size, "batch": batch, "at_once_mb": _decode_mb(work, size, False, batch, sliced=False),
               "one_by_one_mb": _decode_mb(work, size, False, batch, sliced=True)}
        rows.append(row)
        print(f"  decode {batch} × {size}²: at once {_mb(row['at_once_mb'])}, one image at a time "
              f"{_mb(row['one_by_one_mb'])}", flush=True)
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    s = result.get("speed")
    if s:
        left.bar([f"{r['n']}×{r['size']}²" for r in s], [r["mpx_steps_per_s"] for r in s], color="#38c")
        left.set_ylabel("megapixel-steps / s")
        left.set_title(f"demo model; default CPU bound {result['cpu_bound']:g} MPx-steps ≈ "
                       f"{result['bound_seconds']:.0f} s", fontsize=9)
    else:
        left.axis("off")
    m = result["memory"]
    x = range(len(m))
    right.bar([i - 0.2 for i in x], [r["whole_mb"] or 0 for r in m], width=0.4, label="whole")
    right.bar([i + 0.2 for i in x], [r["tiled_mb"] or 0 for r in m], width=0.4, label="tiled")
    right.set_ylabel("peak RSS over the loaded model, MB")
    for k, row in enumerate(result.get("batch_memory", [])):
        i = len(m)
        m = [*m, row]
        right.bar([i - 0.2], [row["at_once_mb"] or 0], width=0.4, color="#c63",
                  label="batch at once" if not k else None)
        right.bar([i + 0.2], [row["one_by_one_mb"] or 0], width=0.4, color="#2a7",
                  label="one image at a time" if not k else None)
    right.set_xticks(list(range(len(m))), [f"{r.get('batch', 1)}×{r['size']}²" for r in m])
    right.set_title("VAE decode: one image whole or tiled; a batch of 4 at once or one by one", fontsize=8)
    right.legend(fontsize=8)
    fig.suptitle(f"bounds, {result['machine']['label']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="speed,cancel,memory",
                        help="what to measure (speed, cancel, memory); the others are kept from the existing JSON")
    parts = set(parser.parse_args(argv).parts.split(","))
    if parts - {"speed", "cancel", "memory"}:
        parser.error(f"unknown parts: {', '.join(sorted(parts - {'speed', 'cancel', 'memory'}))}")
    from sdserve.bounds import DEFAULT_MAX_WORK
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine

    work = Path(tempfile.mkdtemp(prefix="sdserve-bounds-"))
    engine = Engine(ModelRegistry(work, work, extra=["demo"], device="cpu"))
    name = engine.registry.info("demo").name
    label = machine("cpu")["label"]
    path = RESULTS / f"bounds-{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}.json"
    result: dict = json.loads(path.read_text()) if path.exists() and parts != {"speed", "cancel", "memory"} else {}
    result.update({"machine": machine("cpu"), "command": " ".join(sys.argv), "cpu_bound": DEFAULT_MAX_WORK["cpu"]})
    result.setdefault("measured", {}).update({part: result["machine"] for part in parts})  # when each part was
    if "speed" in parts:
        result["speed"] = speed(engine, name)
        slowest = min(r["mpx_steps_per_s"] for r in result["speed"])
        result["bound_seconds"] = DEFAULT_MAX_WORK["cpu"] / slowest
        print(f"  the CPU bound ({DEFAULT_MAX_WORK['cpu']:g} MPx-steps) at the slowest rate: "
              f"{result['bound_seconds']:.0f} s", flush=True)
    if "cancel" in parts:
        result["cancel"] = cancel_latency(engine, name)
    if "memory" in parts:
        result["memory"] = memory(work)
        result["batch_memory"] = batch_memory(work)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
