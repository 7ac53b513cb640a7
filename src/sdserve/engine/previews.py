"""Step previews: the forming picture, read off the latents between denoising steps without the VAE.

A linear projection of each latent pixel's channels to RGB, as A1111's "Approx cheap" live preview: for the SD 1.x
and SDXL VAEs the published coefficients (no weights needed); for any other VAE (the embedded demo's, a model of a
family with no published coefficients) a projection fitted once to that VAE by least squares on a few synthetic
pictures it encodes. The result is latent-sized (1/8 of the picture per side): enough to watch a picture form, at
a cost of one small matrix product per row.
"""

from __future__ import annotations

import base64
import functools
import io
import threading
import weakref
from dataclasses import dataclass
from typing import Any

from PIL import Image

# A1111 modules/sd_vae_approx.py cheap_approximation: latent channel -> (r, g, b), output in -1..1.
SD1_COEFFICIENTS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_COEFFICIENTS = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
                     (-0.3730, -0.2499, -0.2088))
# Which published coefficients a VAE takes: the SD VAE's shape, told apart by its latent scaling factor.
_SD_VAE_BLOCKS = [128, 256, 512, 512]
_FAMILIES = {0.18215: SD1_COEFFICIENTS, 0.13025: SDXL_COEFFICIENTS}

# What goes on the wire: JPEG, at most this many pixels on the long side (a preview of a 2048-pixel picture is 256
# latent pixels across already), so one preview is a few KB in the job store and on every replica's stream.
MAX_SIDE = 256
QUALITY = 80


@dataclass(frozen=True)
class Projection:
    """rgb (0..1) = latent channels @ weight + bias, per latent pixel."""

    weight: Any  # torch tensor (channels, 3)
    bias: Any  # torch tensor (3,)
    fitted: bool  # fitted to this VAE (else a family's published coefficients)

    def render(self, latents: Any) -> list[Image.Image]:
        """One picture per row of `latents` (rows, channels, h, w), latent-sized. In numpy, off torch's thread
        pool: a torch op between two compiled UNet calls wakes its threads, which then spin against the
        compiled engine's for the cores (measured: a step 4% slower than the preview's own time accounts for)."""
        import numpy as np

        x = latents.detach().to("cpu", dtype=latents.new_zeros(()).float().dtype).numpy()
        weight, bias = (t.detach().cpu().float().numpy() for t in (self.weight, self.bias))
        rgb = np.tensordot(x.transpose(0, 2, 3, 1), weight, axes=1) + bias
        pixels = np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8)
        return [Image.fromarray(row) for row in pixels]


def published(vae_config: Any) -> tuple | None:
    """The family's published coefficients for this VAE, or None (then `fit`)."""
    if list(getattr(vae_config, "block_out_channels", [])) != _SD_VAE_BLOCKS or vae_config.latent_channels != 4:
        return None
    for factor, coefficients in _FAMILIES.items():
        if abs(float(vae_config.scaling_factor) - factor) < 1e-4:
            return coefficients
    return None


def _synthetic(count: int, size: int, seed: int = 0) -> Any:
    """Flat, saturated shapes on flat backgrounds (each channel 0, 0.5 or 1), in -1..1: what a fit needs to see
    is how the latents hold colours, and these span them (measured on the demo's VAE: a third less error on its
    pictures than smooth random fields)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.5, 1.0])

    def colour() -> Any:
        return levels[torch.randint(0, 3, (3,), generator=g)].view(3, 1, 1)

    images = torch.empty(count, 3, size, size)
    for i in range(count):
        images[i] = colour()
        for _ in range(2):
            x0, y0 = (int(v) for v in torch.randint(0, size * 2 // 3, (2,), generator=g))
            side = int(torch.randint(size // 6, size // 2, (1,), generator=g))
            images[i, :, y0:y0 + side, x0:x0 + side] = colour()
    return images * 2 - 1


def fit(vae: Any, count: int = 32, size: int = 64) -> Projection:
    """Least squares from the (scaled) latents the VAE's encoder gives to the pictures averaged down to latent
    size: the best linear preview of this VAE's latent space."""
    import torch

    param = next(vae.parameters())
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    images = _synthetic(count, size)
    with torch.inference_mode():
        latents = vae.encode(images.to(param.device, param.dtype)).latent_dist.mean.float().cpu()
        latents = latents * float(vae.config.scaling_factor)
    targets = torch.nn.functional.avg_pool2d((images + 1) / 2, scale)  # (count, 3, h, w) in 0..1
    channels = latents.shape[1]
    a = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(latents.numel() // channels, 1)], 1)
    b = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(a.double(), b.double()).solution.float()
    return Projection(solution[:channels], solution[channels], fitted=True)


_fitted: weakref.WeakKeyDictionary[Any, Projection] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def projection(vae: Any) -> Projection:
    """The projection for this VAE: published where its family has one, else fitted once per VAE module."""
    import torch

    coefficients = published(vae.config)
    if coefficients is not None:
        # published for -1..1 output: rgb01 = (z @ c + 1) / 2
        return Projection(torch.tensor(coefficients) / 2, torch.full((3,), 0.5), fitted=False)
    with _lock:
        found = _fitted.get(vae)
        if found is None:
            found = _fitted[vae] = fit(vae)
        return found


def grid(images: list[Image.Image]) -> Image.Image:
    """A job's images side by side (A1111 shows a batch's preview as one picture)."""
    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    out = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        out.paste(image, (i * width, 0))
    return out


def encode(image: Image.Image) -> tuple[str, int, int]:
    """(base64 JPEG, width, height), bounded to MAX_SIDE on the long side."""
    if max(image.size) > MAX_SIDE:
        image = image.copy()
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.BILINEAR)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=QUALITY)
    return base64.b64encode(buffer.getvalue()).decode(), image.width, image.height


def watch_denoised(scheduler: Any) -> None:
    """Keep the scheduler's last prediction of the finished picture (x0), as A1111 previews `denoised`, not the
    noisy sample: most schedulers return it from `step` beside the next sample (Euler, Euler a, DDIM, LMS, Heun,
    DPM2...); the DPM-Solver++ and UniPC families keep it as their last model output instead (`denoised`)."""
    original = scheduler.step

    # wraps: pipelines read step's signature to decide what to pass (`generator`, `eta`): an ancestral sampler
    # given no generator would draw its noise from the global RNG, and the picture would change
    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        x0 = out[1] if isinstance(out, tuple) and len(out) > 1 else getattr(out, "pred_original_sample", None)
        scheduler._sdserve_x0 = x0
        return out

    scheduler.step = step


def denoised(scheduler: Any, latents: Any) -> Any:
    """The best picture-so-far the scheduler holds after a step: its x0 prediction, else the sample itself."""
    x0 = getattr(scheduler, "_sdserve_x0", None)
    if x0 is not None and x0.shape == latents.shape:
        return x0
    config = scheduler.config
    predicts_x0 = str(getattr(config, "algorithm_type", "")).endswith("dpmsolver++") or getattr(config, "predict_x0", False)
    outputs = getattr(scheduler, "model_outputs", None)
    if predicts_x0 and outputs and outputs[-1] is not None and outputs[-1].shape == latents.shape:
        return outputs[-1]
    return latents
