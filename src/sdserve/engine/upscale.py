"""Upscaling pictures, as A1111 does it: its resamplers and ESRGAN-family models (read by spandrel), for the
extras jobs and for hires fix's pixel upscale.

- `Upscalers.upscale(image, name, scale)` is A1111's `Upscaler.upscale`: the target is the size times `scale`,
  floored to multiples of 8; the upscaler runs until the picture is at least that big (a model's own factor
  each time, at most 3 times) and a Lanczos resize lands it on the target.
- `Upscalers.resize(image, name, size)` is hires fix's: upscale by the larger ratio, then resize to the size.
- `Upscalers.extras(image, spec)` is A1111's extras "Upscale": by a factor or to a size (centred in it when
  cropping), a second upscaler blended in, and the "Postprocess ..." infotext it writes.
- A model runs in tiles of 192 px overlapping by 8 (A1111's ESRGAN_tile defaults), blended where they overlap,
  so memory is bounded whatever the picture's size.
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from sdserve import bounds
from sdserve.catalog import ModelError
from sdserve.schema import PIXEL_UPSCALERS, Extras
from sdserve.upscalers import UpscalerCatalog

log = logging.getLogger(__name__)

TILE, OVERLAP = 192, 8  # A1111's ESRGAN_tile and ESRGAN_tile_overlap defaults
# The built-in upscalers (schema.PIXEL_UPSCALERS): None leaves the picture as it is, the others resample it.
RESAMPLERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
assert {"None", *RESAMPLERS} == set(PIXEL_UPSCALERS)
KEEP_LOADED = 2

Check = Callable[[], None]  # called before each tile a model runs on: raises to stop (a cancel, a shutdown)


class UpscaleError(ValueError):
    """The upscaler cannot run as asked (unknown, refused, unreadable, too large): the client's fault."""


class UpscalersUnavailable(ModelError):
    """This server cannot run upscaler models (spandrel is not installed): the operator's to fix."""


def import_spandrel() -> Any:
    """spandrel, imported; UpscaleError when it is not installed.

    spandrel imports torchvision, for two architectures that are not upscalers (LaMa inpainting, RestoreFormer
    face restoration), at their import. PyPI's torchvision wheels are CUDA builds that fail to import beside a
    CPU torch (pytorch/vision#9337), so a CPU install may have spandrel without torchvision (the Makefile installs
    it so). Then spandrel is imported with a stand-in for the three names those two modules import, which raise
    if called; the stand-in leaves `sys.modules` once spandrel is in, so nothing else takes it for torchvision.
    Only SR and restoration models are used (`Upscalers.model`), which need none of it."""
    if sys.modules.get("spandrel") is not None:
        return sys.modules["spandrel"]
    try:
        if importlib.util.find_spec("torchvision") is not None:
            import spandrel
        else:
            with _torchvision_stand_in():
                import spandrel
    except ImportError as exc:
        raise UpscalersUnavailable(f"upscaler models need spandrel, which is not installed here ({exc}): "
                                   f"pip install 'sdserve[upscalers]' (see the README)") from None
    return spandrel


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this model needs torchvision, which is not installed: only upscaler models run here")

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = enum.Enum("InterpolationMode", "NEAREST BILINEAR BICUBIC")  # type: ignore[attr-defined]
    functional.rotate = functional.normalize = unavailable  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.transforms = transforms  # type: ignore[attr-defined]
    names = {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}
    sys.modules.update(names)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


class Upscalers:
    """The upscaler models of a catalog, loaded on first use onto `device` (the last KEEP_LOADED kept)."""

    def __init__(self, catalog: UpscalerCatalog, device: str) -> None:
        self.catalog = catalog
        self.device = device
        self._loaded: OrderedDict[Path, Any] = OrderedDict()  # by file
        self._lock = threading.Lock()

    def model(self, name: str) -> Any:
        """The spandrel model descriptor of the upscaler `name`."""
        try:
            file = self.catalog.get(name)
        except (KeyError, ValueError) as exc:
            raise UpscaleError(str(exc.args[0])) from None
        with self._lock:
            if file.path in self._loaded:
                self._loaded.move_to_end(file.path)
                return self._loaded[file.path]
        spandrel = import_spandrel()
        try:
            descriptor = spandrel.ModelLoader(self.device).load_from_file(file.path)
        except Exception as exc:  # unsupported, corrupt, truncated: whatever the reader says, the file is at fault
            raise UpscaleError(f"upscaler {name!r} ({file.path.name}) cannot be read: "
                               f"{type(exc).__name__}: {exc}") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
            raise UpscaleError(f"upscaler {name!r} is a {descriptor.architecture.name} model "
                               f"({descriptor.purpose}), not an upscaler")
        descriptor.eval()
        log.info("loaded upscaler %s (%s, x%d)", name, descriptor.architecture.name, descriptor.scale)
        with self._lock:
            self._loaded[file.path] = descriptor
            while len(self._loaded) > KEEP_LOADED:
                self._loaded.popitem(last=False)
        return descriptor

    def prepare(self, name: str) -> None:
        """Load upscaler `name` now if it is a model, so a bad one fails before any other work is done."""
        if name not in PIXEL_UPSCALERS:
            self.model(name)

    def upscale(self, image: Image.Image, name: str, scale: float, check: Check | None = None) -> Image.Image:
        """A1111's Upscaler.upscale (see the module doc)."""
        image = image.convert("RGB")
        target = bounds.scaled(image.width, image.height, scale)
        if min(target) < 1:
            raise UpscaleError(f"upscaling {image.width}x{image.height} by {scale:g} leaves no picture")
        model = None if name in PIXEL_UPSCALERS else self.model(name)
        for attempt in range(3):
            if image.width >= target[0] and image.height >= target[1] and (attempt > 0 or scale != 1):
                break
            before = image.size
            if model is not None:  # one pass: a model at its own factor, a resampler by `scale`
                image = run_tiled(model, image, check=check)
            elif name in RESAMPLERS:
                image = image.resize((int(image.width * scale), int(image.height * scale)), RESAMPLERS[name])
            if image.size == before:
                break
        return image if image.size == target else image.resize(target, Image.LANCZOS)

    def resize(self, image: Image.Image, name: str, size: tuple[int, int], check: Check | None = None) -> Image.Image:
        """Hires fix's pixel upscale to `size` with upscaler `name` (A1111's resize_image, "just resize")."""
        scale = max(size[0] / image.width, size[1] / image.height)
        if scale > 1.0 and name != "None":
            image = self.upscale(image, name, scale, check)
        return image if image.size == size else image.resize(size, Image.LANCZOS)

    def extras(self, image: Image.Image, spec: Extras, check: Check | None = None) -> tuple[Image.Image, dict[str, Any]]:
        """A1111's extras upscale: the picture and its "Postprocess ..." infotext items (the sizes are bounded at
        submission: service._bound_extras)."""
        info: dict[str, Any] = {}
        names = spec.upscalers()
        if not names:
            return image.convert("RGB"), info  # A1111: no first upscaler, no upscale
        if spec.to_size:
            info["Postprocess upscale to"] = f"{spec.width}x{spec.height}"
        else:
            info["Postprocess upscale by"] = spec.scale
        scale = spec.ratio(image.width, image.height)
        crop = spec.output(image.width, image.height) if spec.to_size and spec.crop else None

        def one(name: str) -> Image.Image:
            out = self.upscale(image, name, scale, check)
            if crop is not None:  # centred in the size asked for, as A1111 pastes it
                framed = Image.new("RGB", crop)
                framed.paste(out, (crop[0] // 2 - out.width // 2, crop[1] // 2 - out.height // 2))
                out = framed
            return out

        result = one(names[0])
        if crop is not None:
            info["Postprocess crop to"] = f"{result.width}x{result.height}"
        info["Postprocess upscaler"] = names[0]
        if len(names) > 1:
            result = Image.blend(result, one(names[1]), spec.upscaler_2_visibility)
            info["Postprocess upscaler 2"] = names[1]
        return result, info


def run_tiled(model: Any, image: Image.Image, tile: int = TILE, overlap: int = OVERLAP,
              check: Check | None = None) -> Image.Image:
    """The model over the picture in overlapping tiles, each tile's output weighted by a ramp across the overlap
    so the seams blend; the picture comes back `model.scale` times larger. `check` runs before each tile."""
    import numpy as np
    import torch

    scale = model.scale
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    _, _, height, width = pixels.shape
    out = torch.zeros((1, 3, height * scale, width * scale))
    weight = torch.zeros((1, 1, height * scale, width * scale))
    step = max(tile - overlap, 1)
    ys = sorted({min(y, max(height - tile, 0)) for y in range(0, height, step)})
    xs = sorted({min(x, max(width - tile, 0)) for x in range(0, width, step)})
    with torch.inference_mode():
        for y in ys:
            for x in xs:
                if check is not None:
                    check()
                part = pixels[:, :, y:y + tile, x:x + tile]
                up = model(part.to(model.device)).float().cpu().clamp(0, 1)
                h, w = up.shape[2], up.shape[3]
                ramp = _ramp(h, overlap * scale, y > 0, y + tile < height)[:, None] * \
                    _ramp(w, overlap * scale, x > 0, x + tile < width)[None, :]
                out[:, :, y * scale:y * scale + h, x * scale:x * scale + w] += up * ramp
                weight[:, :, y * scale:y * scale + h, x * scale:x * scale + w] += ramp
    result = (out / weight.clamp_min(1e-8))[0].permute(1, 2, 0).numpy()
    return Image.fromarray((result * 255).round().clip(0, 255).astype("uint8"))


def _ramp(length: int, overlap: int, start: bool, end: bool) -> Any:
    """1 inside a tile, rising from near 0 over `overlap` at an edge another tile overlaps."""
    import torch

    ramp = torch.ones(length)
    n = min(overlap, length)
    if n > 0:
        rise = torch.arange(1, n + 1, dtype=torch.float32) / (n + 1)
        if start:
            ramp[:n] = torch.minimum(ramp[:n], rise)
        if end:
            ramp[-n:] = torch.minimum(ramp[-n:], rise.flip(0))
    return ramp
