"""ControlNet's preprocessors and the fitting of a control image to the picture's size, named as the
sd-webui-controlnet extension names them. No torch: `POST /controlnet/detect` runs these in the API role,
and the engine runs the same before a ControlNet pass.
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageOps

from sdserve import bounds
from sdserve.schema import CONTROL_MODULES, ControlUnit

MODULES = CONTROL_MODULES
_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,}\]$")


def model_name(name: str) -> str:
    """The extension lists models as `name [hash]`; either form names the same model."""
    return _HASH.sub("", name)


def detect(module: str, image: Image.Image, processor_res: int = bounds.PROCESSOR_RES,
           threshold_a: float = bounds.CANNY_LOW, threshold_b: float = bounds.CANNY_HIGH) -> Image.Image:
    """The control map `module` makes of `image`: `none` passes it through; `canny` is OpenCV's Canny edges
    (thresholds a and b) at `processor_res` on the short side, white on black; `invert` turns a drawing of
    black lines on white into white lines on black, the way line ControlNets were trained."""
    rgb = image.convert("RGB")
    if module == "none":
        return rgb
    if module not in MODULES:
        raise ValueError(f"unknown ControlNet module {module!r}; available: {', '.join(MODULES)}")
    w, h = rgb.size
    scale = processor_res / min(w, h)
    work = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    if module == "canny":
        import cv2

        edges = cv2.Canny(np.asarray(work), float(threshold_a), float(threshold_b))
        return Image.fromarray(edges).convert("RGB")
    return ImageOps.invert(work)


def fit(image: Image.Image, size: tuple[int, int], resize_mode: str) -> Image.Image:
    """The control map at the picture's size: stretched (`Just Resize`), covering it and cropped
    (`Crop and Resize`), or inside it with the rest black (`Resize and Fill`)."""
    if image.size == size:
        return image
    if resize_mode == "Just Resize":
        return image.resize(size, Image.LANCZOS)
    if resize_mode == "Crop and Resize":
        return ImageOps.fit(image, size, Image.LANCZOS)
    canvas = Image.new("RGB", size)
    inner = ImageOps.contain(image, size, Image.LANCZOS)
    canvas.paste(inner, ((size[0] - inner.width) // 2, (size[1] - inner.height) // 2))
    return canvas


def control_map(unit: ControlUnit, image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return fit(detect(unit.module, image, unit.processor_res, unit.threshold_a, unit.threshold_b), size,
               unit.resize_mode)
