"""The rules every backend and every dialect share, each in one place.

- what a client request becomes when it is accepted (`job_request`): seed drawn, model pinned,
  LoRA tags taken out of the prompt into one canonical `loras` list, the VAE named without its
  file suffix, input images read once and replaced by their image store keys;
- the idempotency fingerprint of a request;
- the public view of a job;
- which HTTP status a failed job means to a synchronous client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdserve import bounds, loras
from sdserve import controlnet as control
from sdserve.images import ImageDecodeError, base64_bytes, decode_image
from sdserve.schema import GenerationRequest, Job, JobRequest

INPUT_FIELDS = ("init_image", "mask")


class RequestRejected(ValueError):
    """The request is well-formed but cannot run here (unknown model or sampler, unreadable image, over a limit)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelUnavailable(Exception):
    """The model a job would run on failed to load (the message names its file and why): 404 in the dialect's
    shape when the request named it, 503 with Retry-After when it is the server's default. Other models work."""

    def __init__(self, message: str, named: bool) -> None:
        super().__init__(message)
        self.named = named


class NotDoneYet(Exception):
    """A synchronous call's `Prefer: wait=N` ran out before its jobs ended: 202 with where to find them (they go
    on, and their results stay in the job history)."""

    def __init__(self, job_ids: list[str], wait_s: float) -> None:
        super().__init__(f"not done within the {wait_s:g} s its Prefer: wait allowed; the job goes on: "
                         f"GET /api/v1/jobs/{job_ids[0]}")
        self.job_ids, self.wait_s = job_ids, wait_s


class ContentBlocked(RequestRejected):
    """Moderation withheld it: a prompt on the blocklist, or an image a check blocked. 400 in every dialect
    (OpenAI's code: content_policy_violation)."""


# ----- failed jobs -------------------------------------------------------------------------------
# error_kind -> the HTTP status a synchronous client gets, whatever its dialect.
FAILURE_STATUS = {
    "invalid": 422,  # the request cannot run as given
    "canceled": 409,
    "unavailable": 503,  # the model cannot be loaded: an operator problem, retry later or elsewhere
    "timeout": 504,
    "storage": 507,  # the disk is full or the image store refused the write
}


def failure_status(kind: str | None) -> int:
    return FAILURE_STATUS.get(kind or "", 500)


# ----- acceptance --------------------------------------------------------------------------------
def fingerprint(request: GenerationRequest) -> str:
    """What an Idempotency-Key is bound to: the request as the client sent it."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


@dataclass
class InputImage:
    raw: bytes  # exactly what the client sent, decoded from base64: what the image store keeps
    image: Image.Image


def read_inputs(request: GenerationRequest, max_pixels: int) -> dict[str, InputImage]:
    """Decode each input image once (init image, mask, ControlNet images), checking it is a readable image
    within the pixel bound. Keyed by where it sits in the request (`GenerationRequest.input_images`)."""
    inputs = {}
    for field, data in request.input_images().items():
        try:
            raw = base64_bytes(data)
            inputs[field] = InputImage(raw, decode_image(raw, max_pixels=max_pixels))
        except ImageDecodeError as exc:
            raise RequestRejected(f"{field}: {exc}", field) from None
    return inputs


def job_request(request: GenerationRequest, *, model: str | None, keys: Mapping[str, str],
                init_size: tuple[int, int] | None) -> JobRequest:
    """The request as queued: a concrete seed (a re-run after a crash draws the same images), the pinned
    model, the prompt's `<lora:…>` tags moved into `loras` (merged with the field: one canonical form), and
    image store keys in place of the input images."""
    try:
        prompt, tagged = loras.split_prompt(request.prompt)
    except loras.LoraTagError as exc:
        raise RequestRejected(str(exc), "prompt") from None
    fields = request.with_seed().model_dump(exclude=set(INPUT_FIELDS) | {"model", "prompt", "loras", "vae",
                                                                       "controlnet"})
    vae = request.vae.removesuffix(".safetensors") if request.vae else None  # A1111 names VAEs by file name
    controlnet = [unit.model_copy(update={"image": keys[f"controlnet.{i}"], "model": control.model_name(unit.model)})
                  for i, unit in enumerate(request.controlnet)]
    return JobRequest(**fields, prompt=prompt, loras=loras.canonical([*request.loras, *tagged]), vae=vae,
                      controlnet=controlnet, model=model, init_image=keys.get("init_image"), mask=keys.get("mask"),
                      init_size=init_size)


def inline_inputs(requests: Sequence[GenerationRequest],
                  max_pixels: int = bounds.MAX_PIXELS) -> tuple[list[JobRequest], dict[str, Image.Image]]:
    """For running the engine directly (the CLI, tests, benchmarks): the job requests and their decoded inputs,
    keyed `i:field`, so requests with images of their own can share one engine call."""
    queued, images = [], {}
    for i, request in enumerate(requests):
        inputs = read_inputs(request, max_pixels)
        init = inputs.get("init_image")
        queued.append(job_request(request, model=request.model, keys={f: f"{i}:{f}" for f in inputs},
                                  init_size=init.image.size if init else None))
        images.update({f"{i}:{field}": item.image for field, item in inputs.items()})
    return queued, images


# ----- what clients see --------------------------------------------------------------------------
def public_job(job: Job) -> dict[str, Any]:
    """A job as every API reports it (JSON-ready)."""
    return job.model_dump(mode="json")
