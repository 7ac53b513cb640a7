"""An engine that generates nothing: 8x8 grey images at once. For measuring the control plane
(queue, store, HTTP) without the GPU: `SDSERVE_ENGINE=noop`. Never the default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from PIL import Image

from sdserve.engine.pipeline import Engine, GeneratedImage, StepCallback
from sdserve.schema import JobRequest


class NoopEngine(Engine):
    def warm_up(self, model: str | None) -> None:
        return None

    def run(self, requests: Sequence[JobRequest], on_step: StepCallback | None = None,
            inputs: Mapping[str, Image.Image] | None = None) -> list[list[GeneratedImage]]:
        if on_step is not None:
            steps = requests[0].steps
            on_step(steps, steps)
        grey = Image.new("RGB", (8, 8), (128, 128, 128))
        return [[GeneratedImage(grey, r.with_seed().seed + i, f"{r.prompt}\nSteps: {r.steps}, Sampler: noop")
                 for i in range(r.n)] for r in requests]
