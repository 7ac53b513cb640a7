"""Dynamic batching: which queued jobs share one UNet pass.

Jobs can share a pass when their `engine.pipeline.batch_key` is equal: model, mode, size, steps,
sampler and schedule, whether guidance runs at all (each row keeps its own guidance scale), img2img
strength, clip skip, LoRAs, VAE, hires settings and ControlNet settings. Each image keeps its own prompt,
negative prompt, guidance scale and seed.

Fairness: a batch is always built around the head of the queue (highest priority, then
oldest), and only then filled with later jobs of the same shape. So a job never waits behind
more batches than there were jobs ahead of it when it arrived (plus any of higher priority
that arrive later): jobs of a popular shape cannot starve a rare one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from sdserve.engine.pipeline import batch_key
from sdserve.schema import Job


def select(candidates: Sequence[Job], max_images: int) -> list[Job]:
    """The head job, plus later jobs of its shape in queue order, up to `max_images` images.

    The head always runs, even when its own `n` exceeds `max_images`: a job is never split.
    """
    if not candidates:
        return []
    head = candidates[0]
    key = batch_key(head.request)
    chosen, images = [head], head.request.n
    for job in candidates[1:]:
        if images >= max_images:
            break
        if images + job.request.n <= max_images and batch_key(job.request) == key:
            chosen.append(job)
            images += job.request.n
    return chosen


def fair_share(candidates: Sequence[Job], max_images: int, idle_workers: int) -> int:
    """How many images one of `idle_workers` idle workers takes: the queued images split evenly (rounded up),
    at most `max_images`. One worker taking the whole queue would leave the others idle while it works through
    a batch they could have shared."""
    return max(1, min(max_images, math.ceil(images_in(candidates) / max(1, idle_workers))))


def images_in(jobs: Sequence[Job]) -> int:
    return sum(job.request.n for job in jobs)


def default_max_batch(device: str) -> int:
    """Images per UNet pass when the operator does not say: enough to amortise per-step overhead."""
    return 8 if device in ("cuda", "mps") else 16


# While the companions a batch expects are still on their way (the clients of the last batch, sending their next
# request once answered), it may wait up to this share of the last batch's compute time for them: a batch that
# leaves with one image where sixteen were coming costs far more than the wait (16 images in one pass take about
# 3.5x one image's time on a CPU). `--batch-wait-ms` is the least it waits.
LINGER_SHARE = 0.05


def linger_s(batch_wait_s: float, last_run_s: float | None) -> float:
    """How long a claim may wait for expected companions (`Runner._companions`) before it runs what it has."""
    return max(batch_wait_s, LINGER_SHARE * (last_run_s or 0.0))
