"""Run one batch of compatible requests through a diffusers pipeline and return PIL images.

One batch = one pipeline call: every image of every request is a row of the same UNet pass,
each with its own prompt and negative prompt (encoded as A1111 does: `prompts`), guidance scale
and seeded generator (image i of a request uses seed + i, as A1111 does). Requests in a batch
must share a `batch_key`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from sdserve import __version__, bounds, controlnet, loras
from sdserve.engine import accel, adapters, infotext, previews, prompts, samplers, upscale
from sdserve.engine.models import LoadedModel, ModelRegistry
from sdserve.images import read_infotext
from sdserve.schema import GenerationRequest, Hires, JobRequest

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]
# Called before each VAE decoder call (each tile of a tiled decode): where a cancel or shutdown is noticed outside
# the denoising steps. Raises Cancelled to stop.
DecodeCallback = Callable[[], None]
# Told, just before a step's on_step, the previews due at that step: {index of the request in the batch: picture}
# (each request asks for one every `preview_every` steps; engine/previews.py draws them).
PreviewCallback = Callable[[int, dict[int, Image.Image]], None]

# Above this many pixels per image the VAE decodes in tiles of TILE_PX (blended at the seams, as diffusers' tiled
# decode does): memory stays bounded whatever the size, and a cancel is noticed between tiles.
TILE_ABOVE_PX = 1024 * 1024
TILE_PX = 512


class Cancelled(Exception):
    """Raised from a step callback to stop a run between denoising steps."""


class InvalidRequestError(ValueError):
    """The request cannot run as given (bad sampler, unreadable image, ...): the client's fault."""


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    infotext: str
    pixels: Any = None  # float32 HxWx3 in 0..1, before 8-bit rounding (and before the inpaint overlay)
    route: accel.Route = field(default_factory=lambda: accel.Route(accel.TORCH))  # what ran its UNet, and why
    postprocessing: str | None = None  # an extras upscale's "Postprocess ..." items (A1111's own PNG chunk)


@dataclass(frozen=True)
class BatchKey:
    """Requests with equal keys can share one UNet pass: they agree on everything the pass has one value
    for. Each image keeps its own prompt, negative prompt, guidance scale and seed. Whether guidance runs
    at all is shared: at CFG <= 1 diffusers skips the unconditional half, so such jobs pass alone."""

    model: str | None
    mode: str
    width: int | None  # None: the model's native size (the same for every job of that model)
    height: int | None
    steps: int
    sampler: str
    schedule: str
    guided: bool
    strength: float
    clip_skip: int
    loras: tuple[tuple[str, float], ...] = ()  # one set of LoRAs and weights per pass
    vae: str | None = None
    hires: tuple | None = None  # Hires.settings(): all but its prompts (those are per image)
    controlnet: tuple = ()  # each ControlNet unit's settings but its image (that is per job)
    tiling: bool = False  # circular padding is the whole pass's: tiled and untiled rows never mix
    extras: tuple | None = None  # an extras upscale's settings (such jobs run one by one, without the model)


def requested_size(request: JobRequest) -> tuple[int | None, int | None]:
    """Width and height as given, else the init image's (a multiple of 8 within bounds); None = the model's."""
    width, height = request.width, request.height
    if request.init_size is not None and (width is None or height is None):
        w, h = (bounds.snap(v) for v in request.init_size)
        width, height = width or w, height or h
    return width, height


def effective_strength(request: GenerationRequest) -> float:
    if request.mode == "txt2img":
        return 0.0
    if request.mode == "inpaint" and request.inpaint_fill == "noise":
        return 1.0  # start the masked area from pure noise
    return request.strength


def batch_key(request: JobRequest) -> BatchKey:
    """The one rule for which requests may share a pass (the batcher groups by it, the engine checks it).
    Computed from the request alone: no model load, no image decode."""
    if request.extras is not None:
        return BatchKey(model=request.model, mode="extras", width=None, height=None, steps=1, sampler="", schedule="",
                        guided=False, strength=0.0, clip_skip=1, extras=tuple(request.extras.model_dump().values()))
    try:
        resolved = samplers.resolve(request.sampler, request.scheduler)
        sampler, schedule = resolved.sampler.name, resolved.schedule.name
        if resolved.automatic:  # what "Automatic" means depends on the model (samplers.resolve)
            schedule = "automatic"
    except samplers.UnknownSamplerError:
        sampler, schedule = request.sampler, request.scheduler  # fails in the engine, alone
    width, height = requested_size(request)
    return BatchKey(request.model, request.mode, width, height, request.steps, sampler, schedule,
                    request.cfg_scale > 1, effective_strength(request), request.clip_skip,
                    tuple((r.name, r.weight) for r in request.loras), request.vae,
                    None if request.hires is None else request.hires.settings(),
                    tuple(unit.settings() for unit in request.controlnet), request.tiling)


@dataclass
class _Prepared:
    request: GenerationRequest
    width: int
    height: int
    seed: int
    subseed: int
    init_image: Image.Image | None
    mask: Image.Image | None
    start_image: Image.Image | None  # what denoising starts from: the init image, maybe pre-filled under the mask
    controls: list[Image.Image] = field(default_factory=list)  # one control map per ControlNet unit


@dataclass(frozen=True)
class _Row:
    """One image of a batch: its request (prepared) and which of the request's `n` images it is. Every
    per-image list the pipeline takes is read off the rows, in batch order."""

    job: _Prepared
    index: int

    @property
    def seed(self) -> int:
        return self.job.seed + self.index

    @property
    def subseed(self) -> int:
        return self.job.subseed + self.index

    def prompts(self, second_pass: bool = False) -> tuple[str, str]:
        """(prompt, negative prompt); the hires pass's own where the request gives them."""
        request = self.job.request
        if second_pass and request.hires is not None:
            return (request.hires.prompt or request.prompt, request.hires.negative_prompt or request.negative_prompt)
        return request.prompt, request.negative_prompt


@contextmanager
def _decoding(vae: Any, on_decode: DecodeCallback | None, tiled: bool) -> Iterator[None]:
    """For one pipeline call: `on_decode` before each decoder call, a batch decoded one image at a time (the
    decoder's memory is one image's, whatever the batch, and a cancel is noticed between images), and a tiled
    decode when `tiled`."""
    handle = vae.decoder.register_forward_pre_hook(lambda module, args: on_decode()) if on_decode else None
    before = (vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.use_slicing = True
    if tiled:
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, TILE_PX, TILE_PX // scale
    try:
        yield
    finally:
        vae.use_slicing, vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = before
        if handle is not None:
            handle.remove()


@contextmanager
def _circular(pipes: Sequence[Any]) -> Iterator[None]:
    """A1111's tiling, for one batch: every convolution of the pipelines' UNet, VAE and ControlNets pads circularly,
    so the picture wraps around (a seamless texture); zero padding again after."""
    import torch

    convs = {id(m): m for pipe in pipes for part in ("unet", "vae", "controlnet")
             if getattr(pipe, part, None) is not None  # a MultiControlNetModel's modules include each of its nets
             for m in getattr(pipe, part).modules() if isinstance(m, torch.nn.Conv2d)}
    for conv in convs.values():
        conv.padding_mode = "circular"
    try:
        yield
    finally:
        for conv in convs.values():
            conv.padding_mode = "zeros"


class Engine:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.upscalers = upscale.Upscalers(registry.upscalers, registry.device)
        self._on_decode: DecodeCallback | None = None  # the running batch's (run)
        self._on_preview: PreviewCallback | None = None

    @property
    def device(self) -> str:
        return self.registry.device

    def warm_up(self, model: str | None) -> None:
        """Load the model before the first job, so readiness means "can generate now"; with compiled graphs, draw
        one step of one image at the native size, so its first request does not wait for their compilation."""
        loaded = self.registry.load(model)
        if loaded.speedups.graphs:
            started = time.perf_counter()
            self.run([JobRequest(prompt="warm-up", model=model, steps=1, seed=0)])
            log.info("warmed up %s (%s) in %.1f s", loaded.info.name, loaded.speedups.engine,
                     time.perf_counter() - started)

    @staticmethod
    def resolve_size(request: JobRequest, model: LoadedModel) -> tuple[int, int]:
        width, height = requested_size(request)
        return width or model.default_width, height or model.default_height

    @staticmethod
    def _resolve_sampler(request: GenerationRequest, model: LoadedModel) -> samplers.ResolvedSampler:
        try:
            return samplers.resolve(request.sampler, request.scheduler, zero_snr=model.zero_snr)
        except samplers.UnknownSamplerError as exc:
            raise InvalidRequestError(str(exc)) from None

    def run(
        self, requests: Sequence[JobRequest], on_step: StepCallback | None = None,
        inputs: Mapping[str, Image.Image] | None = None, on_decode: DecodeCallback | None = None,
        on_preview: PreviewCallback | None = None,
    ) -> list[list[GeneratedImage]]:
        """Generate every image of every request in one pipeline call; one result list per request.

        `inputs` holds the decoded input images by the keys in each request's `init_image` and `mask`.
        `on_step` is told each denoising step, `on_decode` each VAE decoder call; either may raise Cancelled.
        `on_preview` gets the previews the requests asked for (`preview_every`).
        """
        self._on_decode, self._on_preview = on_decode, on_preview

        if not requests:
            return []
        keys = {batch_key(r) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"requests in one batch must share model, mode, size, steps and sampler: {keys}")
        if requests[0].extras is not None:
            return [[self._extras(r, inputs or {})] for r in requests]
        model = self.registry.load(requests[0].model)
        resolved = self._resolve_sampler(requests[0], model)
        width, height = self.resolve_size(requests[0], model)
        key = replace(keys.pop(), model=model.info.name, width=width, height=height)
        units = requests[0].controlnet
        try:
            pipe = model.pipelines[key.mode]
            if units:
                pipe = adapters.control_pipe(model.pipelines, key.mode, [u.model for u in units], model.adapters,
                                             self.registry.controlnets)
            pipe.scheduler = samplers.make_scheduler(resolved, model.scheduler_config)
            adapters.apply(model.pipelines["txt2img"], model.adapters, requests[0].loras, self.registry.loras)
            adapters.choose_vae(pipe, model.adapters, key.vae, self.registry.vaes)
            adapters.load_embeddings(pipe, model.adapters, self.registry.embeddings)
        except adapters.AddonError as exc:
            raise InvalidRequestError(str(exc)) from None

        prepared = [self._prepare(r, key, inputs or {}) for r in requests]
        hires = requests[0].hires
        rows = [_Row(p, i) for p in prepared for i in range(p.request.n)]

        extra: dict[str, Any] = {}
        if key.mode == "txt2img":
            extra.update(width=key.width, height=key.height)
        else:
            # At least one denoising step, or diffusers refuses the run.
            extra.update(image=[r.job.start_image for r in rows if r.job.start_image is not None],
                         strength=max(key.strength, 1.0 / key.steps))
        if key.mode == "inpaint":
            extra.update(mask_image=[r.job.mask for r in rows if r.job.mask is not None], width=key.width,
                         height=key.height)
        if units:
            extra.update(_control_inputs(units, prepared, key.mode))
        with model.speedups.batch(key.loras, key.controlnet, key.tiling) as route, \
                _circular(([pipe] + ([model.pipelines["img2img"]] if hires else [])) if key.tiling else []):
            if hires is None:
                output = self._denoise(model, pipe, key.steps, key.clip_skip, rows, extra, (key.width, key.height),
                                       on_step, second_order=resolved.sampler.second_order)
            else:
                output = self._hires_fix(model, pipe, key, resolved, hires, rows, extra, on_step)

        results: list[list[GeneratedImage]] = [[] for _ in prepared]
        owner = {id(p): n for n, p in enumerate(prepared)}
        for row, pixels in zip(rows, output):
            p = row.job
            image = _to_image(pixels)
            if p.mask is not None and p.init_image is not None:
                # A1111's overlay: outside the (blurred) mask, the original pixels are pasted back unchanged.
                image = Image.composite(image, p.init_image, p.mask)
            results[owner[id(p)]].append(
                GeneratedImage(image, row.seed, self._infotext(p, row.index, key, resolved, model), pixels,
                               route))
        if route.fallback:
            log.info("batch of %d image(s) ran its UNet on torch: %s", len(rows), route.fallback)
        return results

    def _denoise(
        self, model: LoadedModel, pipe: Any, steps: int, clip_skip: int, rows: Sequence[_Row], extra: dict[str, Any],
        size: tuple[int, int], on_step: StepCallback | None, output_type: str = "np",
        progress: tuple[int, int | None] = (0, None), second_pass: bool = False, first_pass_steps: int | None = None,
        *, second_order: bool,
    ) -> Any:
        """One pipeline call over the batch's rows. `progress`: steps done before this pass and the job's
        total (None: this pass's own count), so a two-pass job reports one progress across both. The prompts
        follow their schedules (`prompts.schedule`; a hires pass's count on from `first_pass_steps`; a
        `second_order` sampler's count twice)."""
        import torch

        gen_device = "cpu" if model.device == "mps" else model.device
        texts, negatives = zip(*(row.prompts(second_pass) for row in rows))
        # Prompt schedules count steps as A1111 does: a second-order sampler's twice (A1111 counts model calls), a
        # hires pass's on from the first pass's. diffusers' loop calls back once per model call where its scheduler
        # has order 2 (Heun, DPM2), once per step otherwise: `counted` maps its index to A1111's count.
        per_step = 2 if second_order else 1
        per_call = getattr(pipe.scheduler, "order", 1)

        def counted(call: int) -> int:
            return call * per_step // per_call

        with torch.inference_mode():
            text = prompts.ScheduledConditioning(pipe, texts, negatives, clip_skip, steps * per_step,
                                                 first_pass_steps and first_pass_steps * per_step)
            text_inputs = text.at(0)
        generators = [torch.Generator(device=gen_device).manual_seed(row.seed) for row in rows]
        if "strength" not in extra and any(row.job.request.varied for row in rows):  # from noise: txt2img
            extra = {**extra, "latents": variation_noise(pipe, rows, generators, size)}
        kwargs: dict[str, Any] = {
            **text_inputs,
            **extra,
            "num_inference_steps": steps,
            "guidance_scale": PerImageGuidance([row.job.request.cfg_scale for row in rows]),
            "generator": generators,
            "num_images_per_prompt": 1,
            "output_type": output_type,  # np floats: converted to PIL by run, so exact values stay inspectable
        }
        if on_step is not None or not text.constant:
            before, total = progress
            show = self._previewer(pipe, rows) if on_step is not None else None

            def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                done, steps = before + step + 1, total or pipeline.num_timesteps
                if show is not None and done < steps:
                    show(done, previews.denoised(pipeline.scheduler, tensors["latents"]))
                if on_step is not None:
                    on_step(done, steps)
                now, after = counted(step), counted(step + 1)
                if text.changes_between(now, after):  # the next call reads other prompts
                    tensors.update({name: value.to(tensors[name]) for name, value in
                                    text.step_inputs(pipeline, after).items()})
                return tensors

            kwargs["callback_on_step_end"] = callback
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents", *text.swapped]
        # Whatever threads the process was given (torch's default), every batch: a fixed count keeps a seed's
        # pixels reproducible to the bit (the summation order follows the thread count).
        with torch.inference_mode(), _decoding(pipe.vae, self._on_decode, size[0] * size[1] > TILE_ABOVE_PX):
            return pipe(**kwargs).images

    def _previewer(self, pipe: Any, rows: Sequence[_Row]) -> Callable[[int, Any], None] | None:
        """What a step calls with its latents to send the previews due then; None when no request wants any."""
        on_preview = self._on_preview
        wanted = [row.job.request.preview_every or 0 for row in rows]
        if on_preview is None or not any(wanted):
            return None
        projection = previews.projection(pipe.vae)
        previews.watch_denoised(pipe.scheduler)  # this batch's own scheduler (made per pass)
        order: dict[int, int] = {}  # a request's rows -> its index in the batch (rows are in request order)
        jobs = [order.setdefault(id(row.job), len(order)) for row in rows]

        def show(step: int, latents: Any) -> None:
            due = [r for r, every in enumerate(wanted) if every and step % every == 0]
            if not due:
                return
            pictures: dict[int, list[Image.Image]] = {}
            for r, picture in zip(due, projection.render(latents[due])):
                pictures.setdefault(jobs[r], []).append(picture)
            on_preview(step, {job: previews.grid(images) for job, images in pictures.items()})

        return show

    def _hires_fix(
        self, model: LoadedModel, pipe: Any, key: BatchKey, resolved: samplers.ResolvedSampler, hires: Hires,
        rows: Sequence[_Row], extra: dict[str, Any], on_step: StepCallback | None,
    ) -> Any:
        """A1111's hires fix: the first pass at the request's size, its latent (or decoded pixels) upscaled,
        then img2img at the larger size with the hires prompts and strength; progress runs across both."""
        import torch

        width, height = hires.target(key.width, key.height)
        if max(width, height) > bounds.MAX_SIZE:
            raise InvalidRequestError(f"hires size {width}x{height} is over {bounds.MAX_SIZE}")
        if not hires.latent:
            try:  # before the first pass, not after it
                self.upscalers.prepare(hires.upscaler)
            except upscale.UpscaleError as exc:
                raise InvalidRequestError(str(exc)) from None
        second_steps = hires.steps or key.steps
        strength = max(hires.strength, 1.0 / second_steps)
        total = key.steps + min(int(second_steps * strength), second_steps)
        first = self._denoise(model, pipe, key.steps, key.clip_skip, rows, extra, (key.width, key.height), on_step,
                              "latent" if hires.latent else "np", (0, total), second_order=resolved.sampler.second_order)
        if hires.latent:
            mode, antialias = LATENT_MODES[hires.upscaler]
            scale = getattr(pipe, "vae_scale_factor", 8)
            with torch.inference_mode():
                image: Any = torch.nn.functional.interpolate(first, size=(height // scale, width // scale), mode=mode,
                                                             antialias=antialias)
        else:
            try:
                image = [self.upscalers.resize(_to_image(px), hires.upscaler, (width, height), self._on_decode)
                         for px in first]
            except upscale.UpscaleError as exc:
                raise InvalidRequestError(str(exc)) from None
        second = model.pipelines["img2img"]
        second.scheduler = samplers.make_scheduler(resolved, model.scheduler_config)
        adapters.choose_vae(second, model.adapters, key.vae, self.registry.vaes)
        return self._denoise(model, second, second_steps, key.clip_skip, rows, {"image": image, "strength": strength},
                             (width, height), on_step, "np", (key.steps, total), second_pass=True,
                             first_pass_steps=key.steps, second_order=resolved.sampler.second_order)

    def _extras(self, request: JobRequest, inputs: Mapping[str, Image.Image]) -> GeneratedImage:
        """An extras job: its init image upscaled (engine/upscale.py). It has no steps to report: a cancel is
        noticed before each tile a model runs on (`on_decode`)."""
        if request.init_image not in inputs:
            raise InvalidRequestError(f"init_image {request.init_image!r} was not given to the engine")
        source = inputs[request.init_image]
        try:
            image, items = self.upscalers.extras(source, request.extras, self._on_decode)
        except upscale.UpscaleError as exc:
            raise InvalidRequestError(str(exc)) from None
        # As A1111 writes it: the source's own infotext kept, the upscale's items in a chunk of their own.
        return GeneratedImage(image, request.seed, read_infotext(source) or "", route=accel.Route(accel.TORCH),
                              postprocessing=", ".join(f"{k}: {v}" for k, v in items.items()) or None)

    def _prepare(self, request: JobRequest, key: BatchKey, inputs: Mapping[str, Image.Image]) -> _Prepared:
        pinned = request.with_seed()
        seed, subseed = pinned.seed, pinned.subseed
        init = mask = None
        for name_of in ("init_image", "mask"):
            name = getattr(request, name_of)
            if name is not None and name not in inputs:
                raise InvalidRequestError(f"{name_of} {name!r} was not given to the engine")
        try:
            size = (key.width, key.height)
            if request.init_image is not None:
                init = inputs[request.init_image].convert("RGB")
                init = ImageOps.fit(init, size, Image.LANCZOS) if request.resize_mode == "crop" else init.resize(size, Image.LANCZOS)
            if request.mask is not None:
                source = inputs[request.mask]
                if request.resize_mode == "crop":
                    source = ImageOps.fit(source, size, Image.NEAREST)
                mask = _binary_mask(source, size, request.mask_blur, request.mask_invert)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        start = init
        if init is not None and mask is not None and request.inpaint_fill in ("fill", "nothing"):
            start = _prefill(init, mask, request.inpaint_fill)
        controls = []
        for unit in request.controlnet:
            if unit.image not in inputs:
                raise InvalidRequestError(f"ControlNet image {unit.image!r} was not given to the engine")
            controls.append(controlnet.control_map(unit, inputs[unit.image], (key.width, key.height)))
        return _Prepared(request, key.width, key.height, seed, subseed, init, mask, start, controls)

    @staticmethod
    def _infotext(
        p: _Prepared, index: int, key: BatchKey, resolved: samplers.ResolvedSampler, model: LoadedModel
    ) -> str:
        r = p.request
        params: dict[str, Any] = {
            "Steps": r.steps,
            "Sampler": resolved.sampler.name,
            "Schedule type": resolved.schedule.label,
            "CFG scale": r.cfg_scale,
            "Seed": p.seed + index,
            "Variation seed": p.subseed + index if r.subseed_strength > 0 else None,
            "Variation seed strength": r.subseed_strength if r.subseed_strength > 0 else None,
            "Seed resize from": f"{r.seed_resize_from_w}x{r.seed_resize_from_h}" if r.seed_resized else None,
            "Size": f"{key.width}x{key.height}",
            "Model hash": model.short_hash,
            "Model": model.info.name,
            "Denoising strength": r.strength if key.mode != "txt2img" else None,
            "Clip skip": r.clip_skip if r.clip_skip > 1 else None,
            "Tiling": True if r.tiling else None,
            "VAE": r.vae,
            **_hires_infotext(r),
            **{f"ControlNet {i}": _control_infotext(u) for i, u in enumerate(r.controlnet)},
            "Mask blur": r.mask_blur if key.mode == "inpaint" else None,
            "Version": f"sdserve {__version__}",
        }
        prompt = " ".join(filter(None, [r.prompt, loras.tags(r.loras)]))  # as A1111 shows it: tags in the prompt
        return infotext.build(prompt, r.negative_prompt, params)


def slerp(strength: float, low: Any, high: Any) -> Any:
    """A1111's slerp of two noises (C, H, W), norms taken along dim 1 as A1111 takes them: strength 0 is `low`,
    1 is `high`."""
    import torch

    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: a straight line is as good
        return low * (1 - strength) + high * strength
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1.0 - strength) * omega) / so).unsqueeze(1) * low
            + (torch.sin(strength * omega) / so).unsqueeze(1) * high)


def variation_noise(pipe: Any, rows: Sequence[_Row], generators: Sequence[Any], size: tuple[int, int]) -> Any:
    """Each row's initial noise as A1111's create_random_tensors makes it: its seed's noise (drawn from the row's
    own generator, as diffusers draws it, so an ancestral sampler's later noise is unchanged), leaned toward its
    variation seed's by subseed_strength, and with seed_resize_from_w/h drawn for that size and centred in this
    one. Rows without either are exactly the noise diffusers would draw."""
    import torch

    scale = getattr(pipe, "vae_scale_factor", 8)
    dtype = pipe.unet.dtype
    shape = (pipe.unet.config.in_channels, size[1] // scale, size[0] // scale)
    out = []
    for row, generator in zip(rows, generators):
        request = row.job.request
        noise = torch.randn((1, *shape), generator=generator, device=generator.device, dtype=dtype)[0]
        if request.varied:
            noise_shape = shape
            base = noise  # the seed's own noise at this size; at another size, drawn for that one
            if request.seed_resized:
                noise_shape = (shape[0], request.seed_resize_from_h // scale, request.seed_resize_from_w // scale)
                own = torch.Generator(device=generator.device).manual_seed(row.seed)
                base = torch.randn((1, *noise_shape), generator=own, device=generator.device, dtype=dtype)[0]
            if request.subseed_strength > 0:
                other = torch.Generator(device=generator.device).manual_seed(row.subseed)
                sub = torch.randn((1, *noise_shape), generator=other, device=generator.device, dtype=dtype)[0]
                base = slerp(request.subseed_strength, base, sub)
            if noise_shape != shape:  # centred: cropped, or padded with this size's own noise
                dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
                w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
                h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
                tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
                noise = noise.clone()
                noise[:, ty:ty + h, tx:tx + w] = base[:, sy:sy + h, sx:sx + w]
            else:
                noise = base
        out.append(noise)
    return torch.stack(out).to(pipe.unet.device)


# A1111's latent upscalers -> torch interpolation mode and antialiasing.
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}


class PerImageGuidance(float):
    """Classifier-free guidance with a scale per image. diffusers' pipelines take one `guidance_scale` and
    apply it as `uncond + scale * (cond - uncond)` over the batch; this float (the largest scale, for the
    pipeline's own `> 1` test) multiplies that difference row by row instead, so requests that differ only in
    CFG share a pass and each image gets exactly what it would alone."""

    def __new__(cls, scales: Sequence[float]) -> PerImageGuidance:
        value = super().__new__(cls, max(scales))
        value.scales = list(scales)
        return value

    def __mul__(self, other: Any) -> Any:
        import torch

        if not isinstance(other, torch.Tensor):
            return float(self) * other
        if len(self.scales) != other.shape[0]:
            raise ValueError(f"{len(self.scales)} guidance scales for a batch of {other.shape[0]}")
        rows = torch.tensor(self.scales, dtype=other.dtype, device=other.device)
        return other * rows.view(-1, *([1] * (other.ndim - 1)))

    __rmul__ = __mul__


def _to_image(pixels: Any) -> Image.Image:
    """A pipeline's float pixels (HxWx3 in 0..1) as an 8-bit picture."""
    return Image.fromarray((pixels * 255).round().clip(0, 255).astype("uint8"))


def _control_inputs(units: Sequence[Any], prepared: Sequence[_Prepared], mode: str) -> dict[str, Any]:
    """The ControlNet pipeline's arguments: each unit's map for every row, and its weight and step range.
    "ControlNet is more important" is diffusers' guess mode (the control on the conditional half only)."""
    maps = [[p.controls[u] for p in prepared for _ in range(p.request.n)] for u in range(len(units))]
    single = len(units) == 1
    # A unit active over no steps (start = end) changes nothing: weight 0 (diffusers refuses an empty range).
    idle = [u.guidance_start >= u.guidance_end for u in units]
    weights = [0.0 if off else u.weight for u, off in zip(units, idle)]
    return {
        # one list of rows for one ControlNet; for several, diffusers takes each row's maps, one per ControlNet
        "image" if mode == "txt2img" else "control_image": maps[0] if single else [list(r) for r in zip(*maps)],
        "controlnet_conditioning_scale": weights[0] if single else weights,
        "control_guidance_start": [0.0 if off else u.guidance_start for u, off in zip(units, idle)],
        "control_guidance_end": [1.0 if off else u.guidance_end for u, off in zip(units, idle)],
        "guess_mode": any(u.control_mode == "ControlNet is more important" for u in units),
    }


def _control_infotext(unit: Any) -> str:
    """A unit as the extension writes it into infotext (`infotext.build` quotes it: it holds commas)."""
    return (f"Module: {unit.module}, Model: {unit.model}, Weight: {unit.weight:g}, Resize Mode: {unit.resize_mode}, "
            f"Processor Res: {unit.processor_res}, Threshold A: {unit.threshold_a:g}, Threshold B: {unit.threshold_b:g}, "
            f"Guidance Start: {unit.guidance_start:g}, Guidance End: {unit.guidance_end:g}, "
            f"Control Mode: {unit.control_mode}")


def _hires_infotext(r: JobRequest) -> dict[str, Any]:
    """A1111's infotext keys for a hires fix, so png-info and "Reuse parameters" read it back."""
    h = r.hires
    if h is None:
        return {}
    return {
        "Denoising strength": h.strength,
        "Hires prompt": h.prompt or None,
        "Hires negative prompt": h.negative_prompt or None,
        "Hires upscale": h.scale if not (h.width or h.height) else None,
        "Hires resize": f"{h.width or 0}x{h.height or 0}" if (h.width or h.height) else None,
        "Hires steps": h.steps or None,
        "Hires upscaler": h.upscaler,
    }


def _binary_mask(mask: Image.Image, size: tuple[int, int], blur: int, invert: bool = False) -> Image.Image:
    """A1111's mask convention: white (or opaque alpha on a transparent image) = repaint."""
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1][0] < 255:
        gray = mask.getchannel("A")
    else:
        gray = mask.convert("L")
    gray = gray.resize(size, Image.NEAREST).point(lambda v: 255 if v >= 128 else 0)
    if invert:
        gray = ImageOps.invert(gray)
    if blur > 0:
        gray = gray.filter(ImageFilter.GaussianBlur(blur))
    return gray


def _prefill(init: Image.Image, mask: Image.Image, how: str) -> Image.Image:
    """A1111's "fill" (colours from around the mask, heavily blurred) and "latent nothing" (flat grey)."""
    if how == "nothing":
        filler = Image.new("RGB", init.size, (127, 127, 127))
    else:
        # Blur the picture with the masked area left out, so only its surroundings bleed in.
        hard = mask.point(lambda v: 255 if v > 0 else 0)
        keep = ImageOps.invert(hard)
        radius = max(init.size) // 8 or 1
        colours = Image.composite(init, Image.new("RGB", init.size), keep).filter(ImageFilter.GaussianBlur(radius))
        weight = keep.filter(ImageFilter.GaussianBlur(radius))
        filler = Image.fromarray(_normalise(colours, weight))
    return Image.composite(filler, init, mask)


def _normalise(colours: Image.Image, weight: Image.Image):
    import numpy as np

    c = np.asarray(colours, dtype=np.float32)
    w = np.asarray(weight, dtype=np.float32)[..., None] / 255.0
    mean = c.reshape(-1, 3).mean(axis=0)
    out = np.where(w > 1e-3, c / np.maximum(w, 1e-3), mean)
    return np.clip(out, 0, 255).astype(np.uint8)
