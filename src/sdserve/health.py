"""Whether this process can write: the job store and the image store share one verdict for readiness."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def probe_folder(folder: Path) -> None:
    """Write, sync and remove a small file: raises OSError when the folder's disk cannot take a write."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        with probe.open("wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        probe.unlink(missing_ok=True)


class WriteHealth:
    """Whether the job store and the image store can take writes. A failed write marks it failing; then at
    most once a second the probes (a small write to each store) test whether it works again. While failing,
    readiness is 503 and submissions get 507."""

    def __init__(self, probes: list[Callable[[], None]]) -> None:
        self.probes = probes
        self.error: str | None = None
        self.full = False  # out of space (507), rather than failing otherwise (503)
        self._probed = 0.0
        self._lock = threading.Lock()

    def failed(self, reason: str, full: bool = False) -> None:
        with self._lock:
            if self.error is None:
                log.error("writes are failing: %s", reason)
            self.error, self.full = reason, full
            self._probed = time.monotonic()

    def check(self) -> str | None:
        """None when writes work; else the reason."""
        with self._lock:
            if self.error is None or time.monotonic() - self._probed < 1.0:
                return self.error
            self._probed = time.monotonic()
            try:
                for probe in self.probes:
                    probe()
            except OSError:
                return self.error
            log.info("writes work again")
            self.error = None
            return None
