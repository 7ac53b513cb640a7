"""Wake-ups between the processes of one host that share a SQLite job store (the API process and its engine
processes under `sdserve serve`, or `sdserve api` and `sdserve worker` on one machine).

A commit others wait for (a job queued: a worker's claim; an event: an SSE stream or a synchronous call) rings
every peer: one datagram to each process's unix socket, in a folder named after the database. A ring is only a
hint to look at the table again now rather than at the next poll, so a lost one costs a poll interval, never a
job: the table is the truth. Stale sockets (a process that was killed) are removed by the first ring that finds
nobody listening.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# How often the list of peers is read again (a process that starts is rung within this, else at its next poll).
PEERS_TTL_S = 0.5


def folder_for(db_path: Path) -> Path:
    """Short (a socket's path has ~100 bytes at most), and the same for every process opening this database."""
    digest = hashlib.sha1(str(db_path.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sdserve-wake-{digest}"


class Wakeup:
    def __init__(self, db_path: Path, on_ring: Callable[[], None]) -> None:
        self.folder = folder_for(db_path)
        self.on_ring = on_ring
        self._peers: tuple[float, list[str]] = (-1e9, [])
        self._sock: socket.socket | None = None
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._out.setblocking(False)
        self.path: str | None = None
        self._pid = os.getpid()
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            path = str(self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            self._sock, self.path = sock, path
        except OSError as exc:  # no tempdir, a path too long: the pollers still see every change
            log.warning("no wake-up socket (%s): processes sharing the job store notice changes by polling", exc)
            return
        threading.Thread(target=self._receive, name="sdserve-wake", daemon=True).start()

    def _receive(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                if not sock.recv(64):
                    return  # shut down (close)
            except OSError:
                return  # closed
            sock.setblocking(False)  # drain: one wake-up covers every ring so far
            with contextlib.suppress(BlockingIOError, InterruptedError):
                while sock.recv(64):
                    pass
            sock.setblocking(True)
            try:
                self.on_ring()
            except Exception:
                log.exception("wake-up handler failed")

    def ring(self) -> None:
        now = time.monotonic()
        if now - self._peers[0] > PEERS_TTL_S:
            try:
                names = os.listdir(self.folder)
            except OSError:
                names = []
            self._peers = (now, [str(self.folder / n) for n in names if str(self.folder / n) != self.path])
        for peer in self._peers[1]:
            try:
                self._out.sendto(b"!", peer)
            except (BlockingIOError, InterruptedError):
                continue  # its buffer is full: it has wake-ups pending anyway
            except OSError as exc:
                if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):  # its process is gone
                    with contextlib.suppress(OSError):
                        os.unlink(peer)
                    self._peers = (-1e9, [])

    def close(self) -> None:
        if self._sock is not None and os.getpid() == self._pid:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # type: ignore[arg-type]
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the receiver's recv()
            self._sock.close()
            self._sock = None
        self._out.close()
