"""How far a seed's image may move when it runs in another batch: other companions, another batch size.

A batched pass does each row's arithmetic, but the CPU library picks its kernels (and how it blocks and sums a
matrix product) by the batch's shape, so the last float bits can differ, and after 8-bit rounding a pixel can
land one level off. `make bench BENCH_ARGS=seeds` measures it per machine (bench/results/seeds-*.json; on a
2-core x86-64: float pixels within 4.4e-6, 8-bit pixels within 1 level on 0.01% of bytes). The bounds below
leave room for other CPUs' kernels. Bytes are compared only where the batch is the same by construction."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FLOAT = 1e-4  # float pixels in 0..1, before 8-bit rounding
LEVELS = 2  # 8-bit pixels, 0..255


def assert_same_picture(a: bytes, b: bytes) -> None:
    """Two PNGs of one seed and settings, which may have run in different batches."""
    x, y = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16) for png in (a, b))
    assert x.shape == y.shape, (x.shape, y.shape)
    worst = int(np.abs(x - y).max())
    assert worst <= LEVELS, f"pixels differ by up to {worst} levels (the batch tolerance is {LEVELS})"
