"""AUTOMATIC1111 `/sdapi/v1` wire format (field names and defaults of A1111 v1.9/1.10)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdserve import __version__, bounds
from sdserve.schema import (
    CONTROL_MODES,
    CONTROL_MODULES,
    CONTROL_RESIZE,
    Extras,
    GenerationRequest,
    random_seed,
)

# A1111 1.10's settings and command-line flags, each with its default (a1111_defaults.json says where from).
_DEFAULTS = json.loads((Path(__file__).parent / "a1111_defaults.json").read_text(encoding="utf-8"))
A1111_OPTIONS: dict[str, Any] = _DEFAULTS["options"]
A1111_CMD_FLAGS: dict[str, Any] = _DEFAULTS["cmd_flags"]

DEFAULT_SAMPLER = "Euler"  # `sampler_name or sampler_index`, and sampler_index defaults to "Euler"
MAX_IMAGES_PER_CALL = 64  # batch_size x n_iter


class TranslationError(ValueError):
    """The A1111 request cannot be expressed here (e.g. an image URL); the message says what to send."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


class Txt2ImgRequest(BaseModel):
    """StableDiffusionTxt2ImgProcessingAPI. Unknown keys are accepted (A1111 clients send many) and reported."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    # A1111's own ranges (its UI's sliders); seeds are integers, never strings or booleans.
    seed: int = Field(-1, ge=-1, strict=True)
    subseed: int = Field(-1, ge=-1, strict=True)
    subseed_strength: float = Field(0, ge=0, le=1)
    seed_resize_from_h: int = Field(-1, ge=-1, le=bounds.MAX_SIZE)
    seed_resize_from_w: int = Field(-1, ge=-1, le=bounds.MAX_SIZE)
    sampler_name: str | None = None
    sampler_index: str | None = DEFAULT_SAMPLER
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    # A1111's API says 512; here a width/height left out takes the model's native size (512 for SD 1.x).
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0, le=1)
    denoising_strength: float | None = Field(None, ge=0, le=1)
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, ge=0, le=1)
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = Field(2.0, ge=1, le=4)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0, le=bounds.MAX_STEPS)
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    force_task_id: str | None = None
    infotext: str | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


INPAINTING_FILL = {0: "fill", 1: "original", 2: "noise", 3: "nothing"}
# A1111 settings a request honours, from override_settings or else the saved /options. Every other option is
# stored and read back (GET/POST /options) and changes nothing here.
HONOURED_SETTINGS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "live_previews_enable",
                     "show_progress_every_n_steps")
MODEL_OWN_VAE = ("Automatic", "None", "")  # A1111's sd_vae values meaning the checkpoint's own VAE


def ignored_fields(body: Txt2ImgRequest) -> list[str]:
    """Fields set to something that would change A1111's output, which this server does not do."""
    ignored = []

    def note(name: str, active: bool) -> None:
        if active:
            ignored.append(name)

    if body.enable_hr and not isinstance(body, Img2ImgRequest):
        note("hr_sampler_name", body.hr_sampler_name not in (None, "", body.sampler_name, body.sampler_index))
        note("hr_scheduler", body.hr_scheduler not in (None, "", body.scheduler))
        note("hr_checkpoint_name", body.hr_checkpoint_name not in (None, "", "Use same checkpoint"))
    note("restore_faces", bool(body.restore_faces))
    for name, script in body.alwayson_scripts.items():
        note(f"alwayson_scripts.{name}", name.lower() != "controlnet" and bool(script) and bool(
            script.get("args") if isinstance(script, dict) else script))
    note("refiner_checkpoint", bool(body.refiner_checkpoint))
    note("s_churn", bool(body.s_churn))
    note("s_noise", body.s_noise not in (None, 1, 1.0))
    note("eta", body.eta not in (None, 0, 1))
    note("infotext", bool(body.infotext))
    for key, value in (body.override_settings or {}).items():
        note(f"override_settings.{key}", key not in HONOURED_SETTINGS and value is not None)
    if isinstance(body, Img2ImgRequest):
        # variation seeds shape the starting noise of txt2img; img2img starts from its image
        note("subseed_strength", body.subseed_strength > 0)
        note("init_images[1:]", len(body.init_images or []) > 1)
        note("resize_mode", body.resize_mode not in (0, 1))
        note("inpaint_full_res", body.mask is not None and body.inpaint_full_res)
        note("image_cfg_scale", body.image_cfg_scale not in (None, 1.5))
        note("latent_mask", bool(body.latent_mask))
    for key, value in (body.model_extra or {}).items():
        note(key, value not in (None, False, 0, "", [], {}))
    return ignored


def control_units(body: Txt2ImgRequest) -> list[dict[str, Any]]:
    """`alwayson_scripts.controlnet.args` (any case of the name) as native ControlNet units, read as the
    sd-webui-controlnet extension reads them: disabled units and units without a model are skipped; the
    image is `image` or `input_image` (a string, or `{"image": …}`), else img2img's init image; modes may be
    numbers; a -1 or missing processor resolution or threshold takes the module's default."""
    scripts = {k.lower(): v for k, v in body.alwayson_scripts.items()}
    script = scripts.get("controlnet")
    args = script.get("args", []) if isinstance(script, dict) else (script or [])
    units = []
    for i, arg in enumerate(args):
        if not isinstance(arg, dict) or not arg.get("enabled", True):
            continue
        model = arg.get("model")
        if model in (None, "", "None", "none"):
            continue
        where = f"alwayson_scripts.controlnet.args[{i}]"
        image = arg.get("image") or arg.get("input_image")
        if isinstance(image, dict):
            image = image.get("image")
        if not image and isinstance(body, Img2ImgRequest) and body.init_images:
            image = body.init_images[0]
        if not image:
            raise TranslationError(f"{where}: a ControlNet unit needs an image", where, 422)
        module = arg.get("module") or "none"
        if module not in CONTROL_MODULES:
            raise TranslationError(f"{where}: module {module!r} is not available here; use one of "
                                   f"{', '.join(CONTROL_MODULES)}", where, 422)
        units.append({
            "image": image, "module": module, "model": model, "weight": arg.get("weight", 1.0),
            "guidance_start": arg.get("guidance_start", 0.0), "guidance_end": arg.get("guidance_end", 1.0),
            "control_mode": _named(arg.get("control_mode"), CONTROL_MODES, "Balanced"),
            "resize_mode": _named(arg.get("resize_mode"), CONTROL_RESIZE, "Crop and Resize"),
            "processor_res": _setting(arg.get("processor_res"), bounds.PROCESSOR_RES),
            "threshold_a": _setting(arg.get("threshold_a"), bounds.CANNY_LOW),
            "threshold_b": _setting(arg.get("threshold_b"), bounds.CANNY_HIGH),
        })
    return units


def _named(value: Any, names: tuple[str, ...], default: str) -> Any:
    """The extension's modes come as names or as their index."""
    if value is None:
        return default
    return names[value] if isinstance(value, int) and 0 <= value < len(names) else value


def _setting(value: Any, default: float) -> Any:
    """A missing or negative (-1: "the module's default") number is the default."""
    return default if value is None or (isinstance(value, (int, float)) and value < 0) else value


def _snap(value: int | None) -> int | None:
    # A1111 floors sizes to the latent grid rather than refusing them.
    return None if value is None else bounds.snap(value, None)


def to_requests(body: Txt2ImgRequest, options: dict[str, Any] | None = None) -> list[GenerationRequest]:
    """One canonical request per n_iter; each of batch_size images. Image i overall uses seed + i, as A1111.
    `options`: the saved A1111 options, for the settings a request does not override."""
    if body.batch_size * body.n_iter > MAX_IMAGES_PER_CALL:
        raise TranslationError(f"batch_size x n_iter is {body.batch_size * body.n_iter}; at most "
                               f"{MAX_IMAGES_PER_CALL} images per call", "batch_size", 422)
    if body.script_name:  # A1111 answers 422 for a script it does not have; this server has none
        raise TranslationError(f"script_name: script {body.script_name!r} not found: this server runs no txt2img or "
                               f"img2img scripts (the always-on ControlNet is honoured)", "script_name", 422)
    seed = body.seed if body.seed >= 0 else random_seed()
    settings = {**(options or {}), **{k: v for k, v in (body.override_settings or {}).items() if v is not None}}
    clip_skip = settings.get("CLIP_stop_at_last_layers", 1)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or not 1 <= clip_skip <= 12:
        raise TranslationError(f"CLIP_stop_at_last_layers must be a whole number from 1 to 12, not {clip_skip!r}",
                               "override_settings.CLIP_stop_at_last_layers", 422)
    vae = settings.get("sd_vae")
    every = settings.get("show_progress_every_n_steps", 10)
    # A1111: 0 turns live previews off, -1 shows the picture only once done (no preview while it forms)
    preview_every = every if settings.get("live_previews_enable", True) and isinstance(every, int) and every > 0 else 0
    hires = None
    if body.enable_hr and not isinstance(body, Img2ImgRequest):
        upscaler = body.hr_upscaler or "Latent"  # a model's name is checked against models/ESRGAN at submission
        hires = dict(scale=body.hr_scale, width=body.hr_resize_x or None, height=body.hr_resize_y or None,
                     upscaler=upscaler, steps=body.hr_second_pass_steps,
                     strength=0.7 if body.denoising_strength is None else body.denoising_strength,
                     prompt=body.hr_prompt, negative_prompt=body.hr_negative_prompt)
    common: dict[str, Any] = dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        model=(body.override_settings or {}).get("sd_model_checkpoint"),
        width=_snap(body.width),
        height=_snap(body.height),
        steps=body.steps,
        cfg_scale=body.cfg_scale,
        clip_skip=clip_skip,
        vae=None if vae is None or vae in MODEL_OWN_VAE else str(vae),
        hires=hires,
        controlnet=control_units(body),
        sampler=body.sampler_name or body.sampler_index or DEFAULT_SAMPLER,
        scheduler=body.scheduler or "automatic",
        n=body.batch_size,
        styles=body.styles or [],
        tiling=bool(body.tiling),
        subseed_strength=body.subseed_strength,
        seed_resize_from_w=max(0, body.seed_resize_from_w),
        seed_resize_from_h=max(0, body.seed_resize_from_h),
        preview_every=min(preview_every, bounds.MAX_STEPS),
    )
    if isinstance(body, Img2ImgRequest):
        if not body.init_images:
            raise TranslationError("init_images is required: a list with one base64 image", "init_images", 422)
        for field, value in (("init_images", body.init_images[0]), ("mask", body.mask)):
            if isinstance(value, str) and value.strip().startswith(("http://", "https://")):
                raise TranslationError(
                    f"{field}: image URLs are not fetched by this server; send the image as base64 or a data URL",
                    field,
                )
        common.update(
            init_image=body.init_images[0],
            mask=body.mask,
            strength=body.denoising_strength if body.denoising_strength is not None else 0.75,
            mask_blur=body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y),
            mask_invert=bool(body.inpainting_mask_invert),
            inpaint_fill=INPAINTING_FILL.get(body.inpainting_fill, "original"),
            resize_mode="crop" if body.resize_mode == 1 else "resize",
        )
    # image i of the call uses seed + i and (its variation) subseed + i, as in A1111, across n_iter too
    subseed = body.subseed if body.subseed >= 0 or body.subseed_strength <= 0 else random_seed()
    return [GenerationRequest(**common, seed=seed + k * body.batch_size,
                              subseed=subseed + k * body.batch_size if subseed >= 0 else -1)
            for k in range(body.n_iter)]


def echo_parameters(body: Txt2ImgRequest) -> dict[str, Any]:
    """The request as A1111 echoes it in `parameters` (without input images unless asked)."""
    data = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        data["init_images"] = None
        data["mask"] = None
    return data


def info_json(
    body: Txt2ImgRequest, *, seeds: list[int], infotexts: list[str], width: int, height: int, model_name: str,
    model_hash: str | None, sampler: str, ignored: list[str], nsfw: list[bool] | None = None,
    prompts: tuple[str, str] | None = None,
) -> str:
    """`info`: a JSON *string*, as A1111 returns it (clients json.loads it). `prompts`: the prompt and negative
    prompt as run (its styles applied), as A1111 reports them."""
    n = len(seeds)
    prompt, negative = prompts or (body.prompt, body.negative_prompt)
    info = {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": negative,
        "all_negative_prompts": [negative] * n,
        "seed": seeds[0] if seeds else body.seed,
        "all_seeds": seeds,
        "subseed": body.subseed,
        "all_subseeds": [body.subseed] * n,
        "subseed_strength": body.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "cfg_scale": body.cfg_scale,
        "steps": body.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": body.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": body.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"sdserve {__version__}",
        "ignored_fields": ignored,
        # Which images moderation withheld (each a black picture in `images`), as A1111's safety-checker
        # extensions mark them.
        "nsfw": nsfw if nsfw is not None else [False] * n,
    }
    return json.dumps(info)


def progress_value(job_no: int, job_count: int, step: int, steps: int) -> float:
    """A1111's formula: 0.01 + job_no/job_count + (1/job_count) * (step/steps), capped at 1."""
    if job_count == 0:
        return 0.0
    return min(1.0, 0.01 + job_no / job_count + (1 / job_count) * (step / steps if steps else 0))


class ExtrasRequest(BaseModel):
    """ExtrasBaseRequest (`/extra-single-image`, `/extra-batch-images`): upscale pictures. Face restoration
    (GFPGAN, CodeFormer) is not here: a visibility over 0 is refused by name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    resize_mode: int = Field(0, ge=0, le=1, description="0: upscaling_resize is a factor; 1: to the w x h size.")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)
    upscaling_resize: float = Field(2.0, gt=0.0, le=8.0)
    upscaling_resize_w: int = Field(512, ge=1, le=bounds.MAX_SIZE)
    upscaling_resize_h: int = Field(512, ge=1, le=bounds.MAX_SIZE)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = Field("", description="The picture: base64 or a data URL.")


class ExtrasImage(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[ExtrasImage] = Field(default_factory=list, max_length=MAX_IMAGES_PER_CALL)  # noqa: N815


def extras_requests(body: ExtrasRequest, images: list[str]) -> list[GenerationRequest]:
    """One extras job per picture."""
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, field) > 0:
            raise TranslationError(f"{field}: face restoration (GFPGAN, CodeFormer) is not available on this server; "
                                   f"send 0", field, 422)
    if not images or not all(images):
        raise TranslationError("an image is required: base64 or a data URL", "image", 422)
    if any(i.strip().startswith(("http://", "https://")) for i in images):
        raise TranslationError("image URLs are not fetched by this server; send the image as base64 or a data URL",
                               "image")
    spec = Extras(scale=body.upscaling_resize, crop=body.upscaling_crop, upscaler=body.upscaler_1,
                  upscaler_2=body.upscaler_2, upscaler_2_visibility=body.extras_upscaler_2_visibility,
                  **({"width": body.upscaling_resize_w, "height": body.upscaling_resize_h} if body.resize_mode == 1
                     else {}))
    return [GenerationRequest(init_image=image, extras=spec, steps=1) for image in images]


def html_info(infotext: str) -> str:
    """A1111's plaintext_to_html of an extras infotext."""
    import html

    return "<p>" + "<br>\n".join(html.escape(line) for line in infotext.split("\n")) + "</p>"
