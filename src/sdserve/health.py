"""Whether this process can write: the job store and the image store share one verdict for readiness."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class WriteHealth:
    """Whether the job store and the image store can take writes. A failed write marks it failing; then at
    most once a second a probe (write and remove a small file in each store's folder) tests whether space
    came back. While failing, readiness is 503 and submissions get 507."""

    PROBE_BYTES = 64 * 1024

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self.error: str | None = None
        self._probed = 0.0
        self._lock = threading.Lock()

    def failed(self, reason: str) -> None:
        with self._lock:
            if self.error is None:
                log.error("writes are failing: %s", reason)
            self.error = reason
            self._probed = time.monotonic()

    def check(self) -> str | None:
        """None when writes work; else the reason."""
        with self._lock:
            if self.error is None or time.monotonic() - self._probed < 1.0:
                return self.error
            self._probed = time.monotonic()
            try:
                for folder in self.folders:
                    probe = folder / f".write-probe-{os.getpid()}"
                    try:
                        with probe.open("wb") as fh:
                            fh.write(b"\0" * self.PROBE_BYTES)
                            fh.flush()
                            os.fsync(fh.fileno())
                    finally:
                        probe.unlink(missing_ok=True)
            except OSError:
                return self.error
            log.info("writes work again")
            self.error = None
            return None
