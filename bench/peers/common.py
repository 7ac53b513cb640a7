"""What every peer server runs: the same pipeline sdserve loads (the demo model, or --model), the same sampler
(DPM++ 2M as sdserve maps it), seed per image, PNG out. Only the serving layer differs between the peers."""

from __future__ import annotations

import io
import os
from pathlib import Path


def load(model: str, threads: int):
    """The txt2img pipeline as sdserve's registry loads it with `--optimize none`, with sdserve's DPM++ 2M
    scheduler."""
    import torch

    torch.set_num_threads(threads)
    from sdserve.engine import samplers
    from sdserve.engine.models import ModelRegistry
    from sdserve.schema import DEFAULT_SAMPLER

    path = Path(model)
    # Plain diffusers in eager torch, as the peers document serving it: sdserve's compiled paths are sdserve's own.
    registry = ModelRegistry(path.parent, Path(os.environ.get("PEER_DATA", "/tmp")), extra=[str(path)], device="cpu",
                             optimize=["none"])
    model = registry.load(str(path))
    pipe = model.pipelines["txt2img"]
    # As sdserve resolves its default sampler for this model: a zero-terminal-SNR model (the demo) gets the
    # schedule made for it under "Automatic", so every system runs the same timesteps.
    resolved = samplers.resolve(DEFAULT_SAMPLER, zero_snr=model.zero_snr)
    pipe.scheduler = samplers.make_scheduler(resolved, model.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, size: int) -> list[bytes]:
    """One pipeline call for the batch; PNG bytes per image."""
    import torch

    images = pipe(prompts, num_inference_steps=steps, width=size, height=size, guidance_scale=7.0,  # A1111 default
                  generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def settings() -> tuple[str, int, int, int, int, float]:
    """model, threads, port, max batch, batch timeout (s): from the environment the harness sets."""
    return (os.environ["PEER_MODEL"], int(os.environ.get("PEER_THREADS", "2")), int(os.environ["PEER_PORT"]),
            int(os.environ.get("PEER_MAX_BATCH", "16")), float(os.environ.get("PEER_BATCH_TIMEOUT", "0.02")))
