"""Dynamic batching: which queued jobs share one UNet pass.

Jobs can share a pass when they agree on everything the pass has one value for: model, mode,
size, steps, sampler and schedule, guidance scale and img2img strength. Each image keeps its
own prompt, negative prompt and seed.

Fairness: a batch is always built around the head of the queue (highest priority, then
oldest), and only then filled with later jobs of the same shape. So a job never waits behind
more batches than there were jobs ahead of it when it arrived (plus any of higher priority
that arrive later): jobs of a popular shape cannot starve a rare one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from sdserve.engine import samplers
from sdserve.engine.pipeline import Engine
from sdserve.schema import GenerationRequest, Job


@dataclass(frozen=True)
class ShapeKey:
    model: str | None
    mode: str
    width: int | None  # None: the model's native size (the same for every job of that model)
    height: int | None
    steps: int
    sampler: str
    schedule: str
    cfg_scale: float
    strength: float


@lru_cache(maxsize=4096)
def _image_size(data: str) -> tuple[int, int] | None:
    from sdserve.images import decode_image

    try:
        return decode_image(data).size  # the header is enough; decode_image loads it, and it is cached
    except ValueError:
        return None


def batch_key(request: GenerationRequest) -> ShapeKey:
    """Computed from the request alone (no model load), so it is cheap inside the queue's claim."""
    try:
        resolved = samplers.resolve(request.sampler, request.scheduler)
        sampler, schedule = resolved.sampler.name, resolved.schedule.name
    except samplers.UnknownSamplerError:
        sampler, schedule = request.sampler, request.scheduler  # fails in the engine, alone
    width, height = request.width, request.height
    if request.init_image is not None and (width is None or height is None):
        size = _image_size(request.init_image)
        width, height = width or (size and size[0]), height or (size and size[1])
    strength = Engine.effective_strength(request)
    return ShapeKey(request.model, request.mode, width, height, request.steps, sampler, schedule,
                    request.cfg_scale, strength)


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


def images_in(jobs: Sequence[Job]) -> int:
    return sum(job.request.n for job in jobs)


def default_max_batch(device: str) -> int:
    """Images per UNet pass when the operator does not say: enough to amortise per-step overhead."""
    return 8 if device in ("cuda", "mps") else 16
