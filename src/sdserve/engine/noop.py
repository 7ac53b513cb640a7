"""An engine that generates nothing: 8x8 grey images. For measuring the control plane (queue, store, HTTP)
without the GPU: `SDSERVE_ENGINE=noop`. Never the default. `SDSERVE_NOOP_STEP_MS` makes each denoising step
take that long (a GPU's pace, reported step by step), for load and fault benchmarks that need jobs to be
running when something breaks."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from PIL import Image

from sdserve.engine.pipeline import DecodeCallback, Engine, GeneratedImage, PreviewCallback, StepCallback
from sdserve.schema import JobRequest


class NoopEngine(Engine):
    def __init__(self, registry, step_s: float = 0.0) -> None:
        super().__init__(registry)
        self.step_s = step_s

    def warm_up(self, model: str | None) -> None:
        return None

    def run(self, requests: Sequence[JobRequest], on_step: StepCallback | None = None,
            inputs: Mapping[str, Image.Image] | None = None, on_decode: DecodeCallback | None = None,
            on_preview: PreviewCallback | None = None) -> list[list[GeneratedImage]]:
        steps = requests[0].steps
        if self.step_s:
            for step in range(1, steps + 1):
                time.sleep(self.step_s)
                if on_step is not None:
                    on_step(step, steps)
        elif on_step is not None:
            on_step(steps, steps)
        grey = Image.new("RGB", (8, 8), (128, 128, 128))
        return [[GeneratedImage(grey, r.with_seed().seed + i, f"{r.prompt}\nSteps: {r.steps}, Sampler: noop")
                 for i in range(r.n)] for r in requests]
