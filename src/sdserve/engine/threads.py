"""How many CPU threads a batch runs on, measured rather than guessed.

On a CPU, torch's intra-op threads pay a fork/join per operator, and in a server they share the cores with
the HTTP event loop and the clients: for a small model at a small size one thread can beat them all (the
old random tiny demo model ran 64x64 faster on one thread of the 2-core development machine), for a larger
one all of them win (the trained demo model: a batch of 16 runs 1.7x faster on two). So batches run on all
the threads the process was given, as torch does by default, and one batch in `EXPLORE` of each batch shape
(model, size, images rounded up to a power of two) tries one thread instead; once one thread's median
seconds per step over its last `WINDOW` tries beats all threads' by `MARGIN`, that shape switches (and keeps
trying the other way). Exploring costs at most one batch in `EXPLORE`. GPUs are not tuned.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Hashable

EXPLORE = 10
WINDOW = 5
MARGIN = 0.05
log = logging.getLogger(__name__)


def shape_of(model: str, size: tuple[int, int], images: int) -> tuple:
    """Batch sizes 5..8 share what they learn, and so on: a shape learns from more batches."""
    return model, size, 1 << max(0, images - 1).bit_length()


class ThreadTuner:
    def __init__(self, max_threads: int) -> None:
        self.most = max(1, max_threads)
        self._samples: dict[Hashable, dict[int, deque[float]]] = {}
        self._chosen: dict[Hashable, int] = {}
        self._batches: dict[Hashable, int] = {}

    def choose(self, shape: Hashable) -> int:
        chosen = self._chosen.get(shape, self.most)
        if self.most == 1:
            return 1
        count = self._batches.get(shape, 0) + 1
        self._batches[shape] = count
        if count % EXPLORE == 0:  # the first batches (count 1..) warm up and measure the default
            return 1 if chosen == self.most else self.most
        return chosen

    def record(self, shape: Hashable, threads: int, seconds_per_step: float) -> None:
        if self.most == 1:
            return
        if self._batches.get(shape, 0) <= 1:
            return  # a shape's first batch pays for allocation: not a fair sample
        samples = self._samples.setdefault(shape, {})
        samples.setdefault(threads, deque(maxlen=WINDOW)).append(seconds_per_step)
        if len(samples) < 2:
            return
        medians = {t: statistics.median(v) for t, v in samples.items()}
        current = self._chosen.get(shape, self.most)
        other = 1 if current == self.most else self.most
        if medians[other] < medians[current] * (1 - MARGIN):
            self._chosen[shape] = other
            log.info("CPU threads for %s: %d (median s/step %s)", shape, other,
                     {t: round(m, 4) for t, m in medians.items()})

    def decided(self) -> dict[Hashable, int]:
        return {shape: self._chosen.get(shape, self.most) for shape in self._batches}
