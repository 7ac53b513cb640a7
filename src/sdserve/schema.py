"""The canonical types every dialect translates into."""

from __future__ import annotations

import random
import re
from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sdserve import bounds, webhooks
from sdserve.loras import LoraRef
from sdserve.webhooks import WebhookEvent

MAX_SEED = 2**32 - 1
DEFAULT_SAMPLER = "DPM++ 2M"


# A Python repr in an error's text (`<_io.BytesIO object at 0x7f…>`) says nothing to a client and leaks a memory
# address: every error a client sees, an answer's or a job's, loses them by this rule.
_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def without_reprs(text: str) -> str:
    return _REPR.sub("the data", text)


def random_seed() -> int:
    # A1111 draws from randrange(4294967294); keep the same range so seeds look familiar.
    return random.randrange(4294967294)


LATENT_UPSCALERS = ("Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                    "Latent (nearest)", "Latent (nearest-exact)")
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")  # built in; models in models/ESRGAN add to them (upscalers.py)


class Hires(BaseModel):
    """A1111's hires fix: the picture is made at the request's size, upscaled (its latent, or its pixels),
    and denoised again at the larger size, in one job of two passes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    scale: float = Field(2.0, ge=1.0, le=4.0, description="Upscale factor (when width and height are not given).")
    width: int | None = Field(None, ge=bounds.MIN_SIZE, le=bounds.MAX_SIZE,
                              description="Target width (A1111 hr_resize_x); 0/None: by scale.")
    height: int | None = Field(None, ge=bounds.MIN_SIZE, le=bounds.MAX_SIZE, description="Target height (hr_resize_y).")
    upscaler: str = Field("Latent", min_length=1, max_length=200, description="Latent variants upscale the latent; "
                          "None, Lanczos, Nearest and the upscaler models (models/ESRGAN) the decoded pixels.")
    steps: int = Field(0, ge=0, le=bounds.MAX_STEPS, description="Second-pass steps; 0: the first pass's.")
    strength: float = Field(0.7, ge=0.0, le=1.0, description="Second-pass denoising strength.")
    prompt: str = Field("", max_length=4000, description="Second-pass prompt; empty: the first pass's.")
    negative_prompt: str = Field("", max_length=4000, description="Second-pass negative prompt; empty: the first's.")

    def target(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size for a first pass of width x height, as A1111 sizes it (multiples of 8):
        by scale; or one side given and the other kept in proportion; or both given (stretched to them)."""
        if not self.width and not self.height:
            w, h = width * self.scale, height * self.scale
        elif not self.height:
            w, h = self.width, self.width * height / width
        elif not self.width:
            w, h = self.height * width / height, self.height
        else:
            return bounds.floor_to_grid(self.width), bounds.floor_to_grid(self.height)
        return bounds.floor_to_grid(w), bounds.floor_to_grid(h)

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALERS

    def settings(self) -> tuple:
        """Everything but the prompts: what a batch shares (the prompts are per image)."""
        return tuple(v for k, v in self.model_dump().items() if k not in ("prompt", "negative_prompt"))


class Extras(BaseModel):
    """A1111's extras upscale, a job of its own: the init image upscaled by `scale`, or to `width` x `height`
    (by the larger ratio, then centred in that size when `crop`), with `upscaler`, and `upscaler_2` blended in
    at `upscaler_2_visibility`. No model, no steps."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    scale: float = Field(2.0, gt=0.0, le=8.0, description="Upscale factor (A1111's upscaling_resize).")
    width: int | None = Field(None, ge=1, le=bounds.MAX_SIZE, description="Target width (with height: resize to).")
    height: int | None = Field(None, ge=1, le=bounds.MAX_SIZE, description="Target height.")
    crop: bool = Field(True, description="Resize to: fill the size and centre the picture in it (A1111's crop).")
    upscaler: str = Field("Lanczos", min_length=1, max_length=200, description="None, Lanczos, Nearest or an "
                          "upscaler model (models/ESRGAN, models/RealESRGAN). None leaves the picture as it is.")
    upscaler_2: str = Field("None", min_length=1, max_length=200, description="A second upscaler, blended in.")
    upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0, description="How much of upscaler_2's picture.")

    @model_validator(mode="after")
    def _both_sides(self) -> Extras:
        if (self.width is None) != (self.height is None):
            raise ValueError("extras: give width and height together (resize to), or neither (scale)")
        return self

    @property
    def to_size(self) -> bool:
        return self.width is not None and self.height is not None

    def upscalers(self) -> list[str]:
        """The upscalers it runs: none when `upscaler` is None (A1111 then leaves the picture as it is), and
        `upscaler_2` only when it is one and shows (visibility over 0)."""
        if self.upscaler == "None":
            return []
        return [self.upscaler] + ([self.upscaler_2] if self.upscaler_2 != "None" and self.upscaler_2_visibility > 0
                                  else [])

    def ratio(self, width: int, height: int) -> float:
        """How much a width x height picture is upscaled: `scale`, or the larger ratio to the size asked for."""
        return max(self.width / width, self.height / height) if self.to_size else self.scale

    def upscaled(self, width: int, height: int) -> tuple[int, int]:
        """The upscaled picture's size, as A1111's upscalers size it: ratio times the sides, floored to the grid."""
        return bounds.scaled(width, height, self.ratio(width, height))

    def output(self, width: int, height: int) -> tuple[int, int]:
        """The result's size: the size asked for when cropping into it, else the upscaled picture's."""
        return (self.width, self.height) if self.to_size and self.crop else self.upscaled(width, height)


CONTROL_MODULES = ("none", "canny", "invert")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE = ("Just Resize", "Crop and Resize", "Resize and Fill")


class ControlUnit(BaseModel):
    """One ControlNet unit, in the sd-webui-controlnet extension's terms: a control image, the preprocessor
    (`module`) that turns it into the control map, the ControlNet model that reads the map, and how strongly
    and over which part of the steps it steers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: str = Field(..., description="The control image (base64 or data URL); in a queued job, its image store key.")
    module: Literal[CONTROL_MODULES] = Field("none", description="Preprocessor: none (the image is the map), "  # type: ignore[valid-type]
                                             "canny (edges), invert (white background, black lines).")
    model: str = Field(..., min_length=1, max_length=200, description="A ControlNet in models/ControlNet.")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps before it starts.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps after which it stops.")
    control_mode: Literal[CONTROL_MODES] = "Balanced"  # type: ignore[valid-type]
    resize_mode: Literal[CONTROL_RESIZE] = "Crop and Resize"  # type: ignore[valid-type]
    processor_res: int = Field(bounds.PROCESSOR_RES, ge=bounds.MIN_SIZE, le=bounds.MAX_SIZE,
                               description="The preprocessor's working resolution (short side).")
    threshold_a: float = Field(bounds.CANNY_LOW, ge=0.0, le=255.0, description="canny: the low threshold.")
    threshold_b: float = Field(bounds.CANNY_HIGH, ge=0.0, le=255.0, description="canny: the high threshold.")

    @model_validator(mode="after")
    def _range(self) -> ControlUnit:
        if self.guidance_end < self.guidance_start:
            raise ValueError("guidance_end must not be before guidance_start")
        return self

    def settings(self) -> tuple:
        """Everything but the image: what a batch shares (the image is per job)."""
        return tuple(v for k, v in self.model_dump().items() if k != "image")


class GenerationRequest(BaseModel):
    """One client request: `n` images sharing prompt and settings (image i uses seed + i)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field("", max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    model: str | None = Field(None, description="Model name; the server's default when omitted.")
    width: int | None = Field(None, ge=bounds.MIN_SIZE, le=bounds.MAX_SIZE, multiple_of=bounds.SIZE_STEP,
                              description="Default: the model's native size.")
    height: int | None = Field(None, ge=bounds.MIN_SIZE, le=bounds.MAX_SIZE, multiple_of=bounds.SIZE_STEP,
                               description="Default: the model's native size.")
    steps: int = Field(bounds.DEFAULT_STEPS, ge=1, le=bounds.MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    clip_skip: int = Field(1, ge=1, le=12, description="Text encoder layers to skip from the end: A1111's "
                           "CLIP_stop_at_last_layers (1 = the last layer, 2 = the penultimate). SD 1.x/2.x.")
    loras: list[LoraRef] = Field(default_factory=list, max_length=16, description="LoRAs from models/Lora and "
                                 "their weights; A1111's <lora:name:weight> tags in the prompt add to these.")
    vae: str | None = Field(None, max_length=200, description="A VAE from models/VAE (its file name); "
                            "None: the model's own. A1111's sd_vae.")
    styles: list[str] = Field(default_factory=list, max_length=16, description="Prompt styles from styles.csv "
                              "(A1111's), applied in order to the prompt and negative prompt at submission.")
    sampler: str = Field(DEFAULT_SAMPLER, description="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M Karras'.")
    scheduler: str = Field("automatic", description="A1111 schedule type: automatic, karras, exponential, ...")
    seed: int = Field(-1, ge=-1, le=MAX_SEED, strict=True, description="-1 draws a random seed (an integer: "
                      "not a string or a boolean).")
    n: int = Field(1, ge=1, le=8, description="Images in this request.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, strict=True, description="Variation seed (A1111's): with "
                         "subseed_strength, the noise leans toward this seed's; image i uses subseed + i; -1 draws one.")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="How far toward the variation seed's noise "
                                    "(a spherical interpolation): 0 none, 1 all the way.")
    seed_resize_from_w: int = Field(0, ge=0, le=bounds.MAX_SIZE, description="Draw the seed's noise as for this "
                                    "width (and seed_resize_from_h), centred: the same seed's picture at another "
                                    "size keeps its composition. 0: off.")
    seed_resize_from_h: int = Field(0, ge=0, le=bounds.MAX_SIZE)
    init_image: str | None = Field(None, description="img2img / inpaint source: base64 or data URL.")
    mask: str | None = Field(None, description="Inpaint mask, white = repaint: base64 or data URL.")
    mask_blur: int = Field(4, ge=0, le=64)
    mask_invert: bool = Field(False, description="Repaint the black part of the mask instead of the white.")
    inpaint_fill: Literal["original", "fill", "noise", "nothing"] = Field(
        "original", description="What the masked area starts from: the original pixels, colours filled in from "
        "around it, pure noise, or nothing (grey). A1111's inpainting_fill 1, 0, 2, 3.")
    resize_mode: Literal["resize", "crop"] = Field(
        "resize", description="Fit the init image to width x height by stretching, or by cropping to the aspect.")
    strength: float = Field(0.75, ge=0.0, le=1.0, description="img2img denoising strength.")
    hires: Hires | None = Field(None, description="A1111's hires fix: a second pass at a larger size (txt2img).")
    extras: Extras | None = Field(None, description="Upscale the init image instead of generating (A1111's extras); "
                                  "the prompt, steps and sampler do not apply.")
    tiling: bool = Field(False, description="A seamless texture: the picture wraps around, left edge into right and "
                         "top into bottom (circular padding in the UNet's and VAE's convolutions). A1111's tiling.")
    controlnet: list[ControlUnit] = Field(default_factory=list, max_length=3, description="ControlNet units.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    preview_every: int | None = Field(None, ge=0, le=bounds.MAX_STEPS, description="Send a preview of the forming "
                                      "picture every this many steps (a `preview` event on the job's stream); 0: "
                                      "none; None: the server's --preview-every.")
    timeout_s: float | None = Field(None, ge=1, le=86400, description="Seconds the job may take, waiting and running.")
    cancel_after_s: float | None = Field(None, ge=1, le=86400, description="Seconds after which the job is no longer "
                                         "wanted: it ends canceled if it has not finished (the Cancel-After header "
                                         "sets it in every dialect).")
    webhook_url: str | None = Field(None, max_length=2000, description="POST the job's events here, signed (Standard "
                                    "Webhooks); a public http(s) address.")
    webhook_events: list[WebhookEvent] | None = Field(None, max_length=6, description="Which events to POST: queued, "
                                                      "started, progress (throttled), completed, failed, canceled. "
                                                      "Default: completed, failed, canceled.")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str | None) -> str | None:
        return None if url is None else webhooks.check_url(url)

    @model_validator(mode="after")
    def _mask_needs_image(self) -> GenerationRequest:
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask needs an init_image to paint into")
        if self.hires is not None and self.init_image is not None:
            raise ValueError("hires is for txt2img; for a larger img2img, ask for the larger size")
        if self.extras is not None and (self.init_image is None or self.mask is not None or self.controlnet
                                        or self.n != 1):
            raise ValueError("extras upscales one init_image: no mask, controlnet or n")
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        return self

    @property
    def webhook(self) -> str | None:
        """What the job store keeps of the webhook (webhooks.spec), or None."""
        events = self.webhook_events if self.webhook_events is not None else webhooks.DEFAULT_EVENTS
        return webhooks.spec(self.webhook_url, list(dict.fromkeys(events)))

    def input_images(self) -> dict[str, str]:
        """The request's input images by where they sit: `init_image`, `mask`, `controlnet.<i>`."""
        found = {f: getattr(self, f) for f in ("init_image", "mask") if getattr(self, f) is not None}
        found.update({f"controlnet.{i}": unit.image for i, unit in enumerate(self.controlnet)})
        return found

    @property
    def mode(self) -> Literal["txt2img", "img2img", "inpaint", "extras"]:
        if self.extras is not None:
            return "extras"
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    def with_seed(self) -> GenerationRequest:
        """The same request with a concrete seed (and variation seed, where it has a strength), so a re-run after a
        restart gives the same images."""
        update = {}
        if self.seed < 0:
            update["seed"] = random_seed()
        if self.subseed < 0 and self.subseed_strength > 0:
            update["subseed"] = random_seed()
        return self.model_copy(update=update) if update else self

    @property
    def seed_resized(self) -> bool:
        """Its seed's noise is drawn as for another size (seed_resize_from_w/h)."""
        return self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0

    @property
    def varied(self) -> bool:
        """Its initial noise is not simply its seed's: a variation seed, or the noise of another size."""
        return self.subseed_strength > 0 or self.seed_resized


class JobRequest(GenerationRequest):
    """A request as the queue holds it (`core.job_request` makes it): seed drawn, model pinned, and the input
    images moved out to the image store. `init_image` and `mask` are their keys there, never image data,
    so a job record stays small however large its inputs were; `init_size` is the init image's size,
    read once at submission, so batching never decodes an image."""

    init_image: str | None = Field(None, description="Image store key of the init image.")
    mask: str | None = Field(None, description="Image store key of the inpainting mask.")
    init_size: tuple[int, int] | None = Field(None, description="Width and height of the init image.")


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in FINAL_STATUSES


# The one set of final statuses: a job in one has ended and never changes again (events, SQL and Lua read it).
FINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


class ImageRef(BaseModel):
    id: str
    url: str | None = Field(..., description="Where to fetch it; None when moderation blocked it.")
    seed: int
    width: int | None = None
    height: int | None = None
    blocked: bool = Field(False, description="Moderation withheld this image: it was never stored.")
    reason: str | None = Field(None, description="Why it was blocked.")
    engine: str | None = Field(None, description="What ran its UNet: 'openvino', 'torch.compile' or 'torch'.")
    fallback: str | None = Field(None, description="Why it ran on torch although a compiled path was on: 'lora', "
                                                   "'controlnet'.")


class Job(BaseModel):
    """A request's life in the queue, as every API reports it."""

    id: str
    status: JobStatus
    request: JobRequest
    source: str = Field("native", description="The API dialect that submitted it.")
    queue_position: int | None = Field(None, description="Jobs ahead of this one; 0 = next.")
    progress: float = Field(0.0, ge=0.0, le=1.0)
    step: int = 0
    steps: int = 0
    eta_s: float | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    error: str | None = None
    error_kind: str | None = Field(None, description="invalid | timeout | canceled | unavailable | storage | internal")
    images: list[ImageRef] = Field(default_factory=list)
    batch_id: str | None = Field(None, description="Jobs run in the same UNet pass share this id.")
    batch_images: int | None = Field(None, description="Images in that pass, this job's and its companions'.")
    worker: str | None = Field(None, description="The worker that ran it (or runs it now).")
    label: str | None = Field(None, description="Who submitted it: its API key's label (keys file), the Basic "
                              "user, or 'anonymous'; never the key itself.")
    # The caller that submitted it (keys.Caller.id): who may see and touch it. Never shown in any answer.
    owner: str = Field("", exclude=True)

    @field_validator("error")
    @classmethod
    def _no_reprs(cls, error: str | None) -> str | None:
        return None if error is None else without_reprs(error)
