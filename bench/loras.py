"""What a LoRA costs on the demo model (`make bench-loras`).

- load: the first use of a LoRA file (read, peft injection into UNet and text encoder);
- switch: making another loaded set active (`set_adapters`), and back to none (`disable_lora`);
- fuse / unfuse: merging the active set into the weights and taking it out again;
- denoising with a LoRA active (peft's extra low-rank matmuls per layer) vs none vs fused, batch 8.

LoRAs are written with random factors (rank 8, every attention projection) in kohya keys, the format most
users have. Writes bench/results/loras.json and .png.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the LoRA writer the tests use


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    import torch
    from tinymodels import lora_factors, save_lora

    from sdserve.core import inline_inputs
    from sdserve.engine import adapters
    from sdserve.engine.models import ModelRegistry
    from sdserve.engine.pipeline import Engine
    from sdserve.loras import LoraRef
    from sdserve.schema import GenerationRequest

    work = Path(tempfile.mkdtemp(prefix="sdserve-lora-bench-"))
    registry = ModelRegistry(work, work, extra=["demo"], device="cpu")
    model = registry.load(None)
    pipe = model.pipelines["txt2img"]
    for i, name in enumerate(("a", "b", "c")):
        save_lora(lora_factors(pipe, seed=i, rank=8, scale=0.05), work / "Lora" / f"{name}.safetensors", "kohya")
    catalog, state = registry.loras, model.adapters

    def use(*names: str) -> None:
        adapters.apply(pipe, state, [LoraRef(name=n, weight=0.8) for n in names], catalog)

    results: dict = {"model": "demo", "rank": 8, "torch": torch.__version__}
    results["load_s"] = timed(lambda: (use("a"), use()), 1)[0]  # first load of a, then none
    use("b"), use("c"), use()  # load the others
    sets = [("a",), ("b",), ("a", "b"), ("c",), ()]
    switches = []
    for _ in range(5):
        for s in sets:
            started = time.perf_counter()
            use(*s)
            switches.append(time.perf_counter() - started)
    results["switch_s"] = {"median": statistics.median(switches), "max": max(switches)}
    use("a", "b")
    results["fuse_s"] = timed(lambda: (pipe.fuse_lora(), pipe.unfuse_lora()), 3)

    engine = Engine(registry)
    requests, _ = inline_inputs([GenerationRequest(prompt="a red circle", seed=i, n=1) for i in range(8)])

    def batch(loras: list[dict]) -> float:
        queued = [r.model_copy(update={"loras": [LoraRef(**x) for x in loras]}) for r in requests]
        return timed(lambda: engine.run(queued), 1)[0]

    runs = {"none": [], "lora_active": []}
    batch([]), batch([{"name": "a"}])  # warm
    for _ in range(5):
        runs["none"].append(batch([]))
        runs["lora_active"].append(batch([{"name": "a", "weight": 0.8}]))
    results["batch8_s"] = {k: statistics.median(v) for k, v in runs.items()}
    results["lora_over_none"] = results["batch8_s"]["lora_active"] / results["batch8_s"]["none"]
    print(json.dumps(results, indent=1))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "loras.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "loras.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    fuse = statistics.median(results["fuse_s"])
    left.bar(["first load", "switch (median)", "fuse + unfuse"],
             [results["load_s"] * 1000, results["switch_s"]["median"] * 1000, fuse * 1000])
    left.set_ylabel("ms")
    left.set_title("LoRA set-up costs")
    b = results["batch8_s"]
    right.bar(["no LoRA", "LoRA active (unfused)"], [b["none"], b["lora_active"]])
    right.set_ylabel("s per batch of 8 (20 steps)")
    right.set_title(f"Denoising: {results['lora_over_none']:.2f}x with a LoRA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
