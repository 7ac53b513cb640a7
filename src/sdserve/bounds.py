"""Every built-in bound and default of a request, once. Settings, the canonical schema, each dialect's
translation, the engine and the CLI read them here; an operator's settings (`config.Settings`) can tighten the
bounds, never loosen them."""

from __future__ import annotations

MIN_SIZE = 64  # pixels, each side
MAX_SIZE = 2048
SIZE_STEP = 8  # sides are multiples of the VAE's scale factor
MAX_STEPS = 150
DEFAULT_STEPS = 20
MAX_IMAGES = 8  # images per request
MAX_PIXELS = 4096 * 4096  # an input image's decoded pixels (a decompression bomb is refused)

# One request's work (megapixel-steps, `service.request_work`) by device class, unless --max-work says otherwise:
# about what the class finishes within the default 600 s job timeout, so no request within the limits outlives it
# and every one can be canceled (measured: README, Bounds). An API replica (no engine) bounds for its workers' GPUs.
DEFAULT_MAX_WORK = {"cpu": 40.0, "mps": 160.0, "cuda": 2048.0}

# ControlNet preprocessors (A1111's extension: -1 means "the module's default").
PROCESSOR_RES = 512  # the preprocessor's working resolution (short side)
CANNY_LOW = 100.0  # threshold_a
CANNY_HIGH = 200.0  # threshold_b


def floor_to_grid(value: float) -> int:
    """A side floored to the latent grid, unbounded (the hires target, bounded by its own fields)."""
    value = int(value)
    return value - value % SIZE_STEP


def scaled(width: int, height: int, ratio: float) -> tuple[int, int]:
    """A picture's sides times `ratio`, floored to the grid: the size A1111's upscalers aim for."""
    return floor_to_grid(width * ratio), floor_to_grid(height * ratio)


def snap(value: float, limit: int | None = MAX_SIZE) -> int:
    """A side floored to the latent grid and kept within MIN_SIZE..limit (None: no upper bound here; A1111
    floors rather than refuses)."""
    floored = floor_to_grid(value)
    return max(MIN_SIZE, floored if limit is None else min(limit, floored))
