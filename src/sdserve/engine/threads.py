"""How many CPU threads a batch runs on, measured rather than guessed.

On a CPU, torch's intra-op threads pay a fork/join per operator, and in a server they share the cores with
the HTTP event loop and the clients: for a small model at a small size one thread can beat them all, for a
larger one all of them win (on the 2-core development machine the old random tiny model ran 64x64 faster on
one thread; the trained demo model runs a lone image about as fast on either and a batch of 16 faster on
two). So the engine measures, per batch shape (model, size, images): after one warm-up batch, each candidate
(1 thread, all of them) runs `TRIALS` times, alternating, and the faster (median seconds per step over the
last `WINDOW` batches) is used. Conditions change (other processes, a client on the same machine), so one
batch in `EXPLORE` keeps trying the other candidate and the choice follows. The trial batches are real work,
just possibly not the fastest. GPUs are not tuned (their threads do not run the model).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Hashable

TRIALS = 2
WINDOW = 6
EXPLORE = 20
log = logging.getLogger(__name__)


class ThreadTuner:
    def __init__(self, max_threads: int) -> None:
        self.candidates = sorted({1, max(1, max_threads)})
        self._seen: set[Hashable] = set()
        self._samples: dict[Hashable, dict[int, deque[float]]] = {}
        self._chosen: dict[Hashable, int] = {}
        self._batches: dict[Hashable, int] = {}

    def choose(self, shape: Hashable) -> int:
        if len(self.candidates) == 1:
            return self.candidates[0]
        if shape not in self._seen:  # the first batch of a shape pays for allocation: not a fair trial
            return self.candidates[-1]
        chosen = self._chosen.get(shape)
        if chosen is None:  # still trying: the candidate with the fewest samples
            samples = self._samples.get(shape, {})
            return min(self.candidates, key=lambda t: (len(samples.get(t, ())), -t))
        count = self._batches.get(shape, 0) + 1
        self._batches[shape] = count
        if count % EXPLORE == 0:
            return next(t for t in self.candidates if t != chosen)
        return chosen

    def record(self, shape: Hashable, threads: int, seconds_per_step: float) -> None:
        if len(self.candidates) == 1:
            return
        if shape not in self._seen:
            self._seen.add(shape)
            return
        samples = self._samples.setdefault(shape, {})
        samples.setdefault(threads, deque(maxlen=WINDOW)).append(seconds_per_step)
        if all(len(samples.get(t, ())) >= TRIALS for t in self.candidates):
            best = min(self.candidates, key=lambda t: statistics.median(samples[t]))
            if self._chosen.get(shape) != best:
                log.info("CPU threads for %s: %d (median s/step %s)", shape, best,
                         {t: round(statistics.median(v), 4) for t, v in samples.items()})
            self._chosen[shape] = best

    def decided(self) -> dict[Hashable, int]:
        return dict(self._chosen)
