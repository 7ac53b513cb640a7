"""`sdserve serve`: the HTTP API in this process, the engine in worker processes it supervises.

The API process imports no torch (as `sdserve api`); each engine process is an `sdserve worker` on the same
embedded job store (jobs/local.py), so one host runs the same two roles as a cluster on Redis. vLLM and LitServe
moved their engines out of the HTTP process for the same reason: one interpreter lock shared by uvicorn, event
streams, the queue and the engine slows both.

Processes: this one forks a *launcher* at start, before it has threads. The launcher imports the engine once
(torch, diffusers) and forks each engine process from that, so a restart costs a model load, not the imports.
Every child dies with its parent (PR_SET_PDEATHSIG): the launcher with this process, engines with the launcher.

A killed engine process is restarted (with a backoff if it keeps dying); the jobs it held go back to the queue
at once, since its pid no longer runs (`SQLiteJobQueue.recover`, from the API's reaper), and run again. Until a
replacement is ready, `/readyz` answers 503 with the reason; the API keeps accepting and queueing meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdserve.config import Settings
    from sdserve.jobs.queue import SharedState

log = logging.getLogger(__name__)

# A process that dies within this of its start counts as crashing: its next start waits (doubling, up to the max).
CRASH_WINDOW_S = 30.0
RESTART_BACKOFF_MAX_S = 30.0
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Linux: this process gets `sig` when its parent exits (a crash or kill -9 of the parent included)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall((json.dumps(message) + "\n").encode())


class _Lines:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def read(self) -> list[dict[str, Any]] | None:
        """The messages that arrived (None: the other end closed)."""
        data = self.sock.recv(65536)
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


# ----- the launcher (a child of the API process) -------------------------------------------------------------
def _launcher(sock: socket.socket, settings: Settings, parent: int) -> None:
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # torch.cuda.is_available() and device_count() would initialize CUDA here, and a process forked after that
    # cannot use it: ask NVML instead, and leave CUDA to each engine process.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    lines = _Lines(sock)
    children: dict[int, int] = {}  # pid -> slot
    imported = False
    while True:
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            try:
                messages = lines.read()
            except OSError:
                messages = None
            if messages is None:  # the API process closed its end: it is stopping or gone
                os._exit(0)
            for message in messages:
                if not imported:  # the engine's imports, once, for every fork
                    from sdserve.engine import preload
                    from sdserve.engine.models import resolve_device

                    preload()
                    imported = True
                if message["op"] == "devices":
                    device = resolve_device(settings.device)
                    count = 1
                    if device == "cuda":
                        import torch

                        count = torch.cuda.device_count()
                    _send(sock, {"op": "devices", "device": device, "count": count})
                elif message["op"] == "start":
                    me = os.getpid()
                    pid = os.fork()
                    if pid == 0:
                        sock.close()
                        _engine(settings, message, me)  # never returns
                    children[pid] = message["slot"]
                    _send(sock, {"op": "started", "slot": message["slot"], "pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = children.pop(pid, None)
            if slot is not None:
                _send(sock, {"op": "exited", "slot": slot, "pid": pid, "status": status})


def _engine(settings: Settings, message: dict[str, Any], launcher: int) -> None:
    """An engine process: `sdserve worker` on the API's job store, in a fork of the launcher."""
    code = 1
    try:
        die_with_parent(signal.SIGKILL)  # the launcher is gone only when the API process is: a crash, not a stop
        if os.getppid() != launcher:  # it died before that took effect
            os._exit(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API process stops it (SIGTERM) once intake is closed
        os.environ.update(message["env"])
        if message.get("threads"):
            import torch

            torch.set_num_threads(message["threads"])
        worker = settings.model_copy(update={"name": message["name"], "device": message["device"]})
        run_worker(worker)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("engine process failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_worker(settings: Settings, probe_port: int | None = None) -> None:
    """The worker role until SIGTERM or SIGINT: take jobs and run them; finish the running batch within the grace
    period, else hand it back to the queue. `sdserve worker` and each engine process of `sdserve serve`."""
    from sdserve.service import Service

    service = Service(settings, "worker")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda *_: stop.set())
    service.start()
    probe = None
    if probe_port:
        import uvicorn

        from sdserve.api.app import create_ops_app

        probe = uvicorn.Server(uvicorn.Config(create_ops_app(service), host=settings.host, port=probe_port,
                                              log_level="warning", access_log=False))
        probe.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # signals stay ours
        threading.Thread(target=probe.run, name="sdserve-probe", daemon=True).start()
    assert service.runner is not None
    log.info("worker %s (pid %d) on %s: queue %s, images %s, model %s", service.runner.name, os.getpid(),
             service.runner.engine.device, settings.queue or "sqlite", service.images.location,
             settings.models[0] if settings.models else "-")
    stop.wait()
    service.shutdown()
    if probe is not None:
        probe.should_exit = True


# ----- the supervisor (in the API process) -------------------------------------------------------------------
@dataclass
class _Slot:
    index: int
    name: str
    device: str
    env: dict[str, str]
    threads: int | None
    pid: int | None = None
    started: float = 0.0
    failures: int = 0  # deaths in a row, each within CRASH_WINDOW_S of its start
    exited: str | None = None  # why the last one ended, while no replacement is ready
    restart_at: float | None = None


class Supervisor:
    """Starts the engine processes, restarts those that die, and says whether one is ready (`readiness`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shared: SharedState | None = None
        self.slots: list[_Slot] = []
        self._stopping = False
        self._lock = threading.Lock()
        self._exits = threading.Condition(self._lock)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        me = os.getpid()
        pid = os.fork()  # now, while this process has one thread
        if pid == 0:
            parent.close()
            try:
                _launcher(child, settings, me)
            finally:
                os._exit(0)
        child.close()
        self.launcher_pid = pid
        self._sock = parent
        self._lines = _Lines(parent)

    def start(self, shared: SharedState) -> None:
        """Ask the launcher what devices there are, start one engine process per slot, then watch them."""
        self.shared = shared
        _send(self._sock, {"op": "devices"})
        reply = self._wait_for("devices")
        device, gpus = reply["device"], reply["count"]
        count = self.settings.workers or (max(1, gpus) if device == "cuda" else 1)
        cores = os.cpu_count() or 1
        base = self.settings.name or f"{socket.gethostname()}-engine"
        for i in range(count):
            env: dict[str, str] = {}
            if device == "cuda" and gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)  # one GPU each, as `cuda` (its first)
            threads = max(1, cores // count) if device == "cpu" and count > 1 else None
            # --name names the one engine process, or numbers several
            name = base if self.settings.name and count == 1 else f"{base}{'-' if self.settings.name else ''}{i}"
            self.slots.append(_Slot(i, name, device, env, threads))
        for slot in self.slots:
            self._launch(slot)
        threading.Thread(target=self._watch, name="sdserve-supervisor", daemon=True).start()
        log.info("%d engine process(es) on %s%s", count, device,
                 f", {self.slots[0].threads} threads each" if self.slots[0].threads else "")

    def _wait_for(self, op: str) -> dict[str, Any]:
        while True:
            messages = self._lines.read()
            if messages is None:
                raise RuntimeError("the engine launcher exited")
            for message in messages:
                if message["op"] == op:
                    return message

    def _launch(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.started = time.monotonic()
        _send(self._sock, {"op": "start", "slot": slot.index, "name": slot.name, "device": slot.device,
                           "env": slot.env, "threads": slot.threads})

    def _watch(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._sock], [], [], 0.5)
                messages = self._lines.read() if ready else []
            except (OSError, ValueError):
                messages = None
            if messages is None:
                if not self._stopping:
                    log.error("the engine launcher exited: no engine process can be restarted")
                with self._lock:
                    for slot in self.slots:
                        slot.pid, slot.exited = None, slot.exited or "the engine launcher exited"
                    self._exits.notify_all()
                return
            for message in messages:
                self._handle(message)
            now = time.monotonic()
            with self._lock:  # no start once stop() began
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at and not self._stopping:
                        self._launch(slot)

    def _handle(self, message: dict[str, Any]) -> None:
        slot = self.slots[message["slot"]]
        if message["op"] == "started":
            with self._lock:
                slot.pid = message["pid"]
            log.info("engine process %s started (pid %d)", slot.name, slot.pid)
            return
        if message["op"] != "exited":
            return
        how = _describe(message["status"])
        with self._lock:
            slot.pid = None
            self._exits.notify_all()
        if self.shared is not None:
            with contextlib.suppress(Exception):
                self.shared.drop_worker(slot.name)
        if self._stopping:
            log.info("engine process %s (pid %d) %s", slot.name, message["pid"], how)
            return
        quick = time.monotonic() - slot.started < CRASH_WINDOW_S
        slot.failures = slot.failures + 1 if quick else 1
        delay = min(RESTART_BACKOFF_MAX_S, 0.5 * 2 ** (slot.failures - 1)) if quick else 0.0
        slot.exited = f"engine process {slot.name} {how}; restarting" + (f" in {delay:.0f} s" if delay >= 1 else "")
        log.error("engine process %s (pid %d) %s: restarting it%s; the jobs it held run again", slot.name,
                  message["pid"], how, f" in {delay:.1f} s" if delay else "")
        slot.restart_at = time.monotonic() + delay

    def workers(self) -> dict[str, dict[str, Any]]:
        """This server's engine processes as they registered (the shared registry), by name."""
        assert self.shared is not None
        mine = {slot.name for slot in self.slots}
        return {w["name"]: w for w in self.shared.workers() if w["name"] in mine}

    def readiness(self) -> tuple[bool, str]:
        """Ready while one engine process is: it runs, and its default model is loaded."""
        if self.shared is None or not self.slots:
            return False, "starting the engine processes"
        registered = self.workers()
        reasons = []
        for slot in self.slots:
            info = registered.get(slot.name)
            if slot.pid is not None and info is not None and info.get("pid") == slot.pid:
                if info.get("ready"):
                    slot.exited = None
                    return True, "ready"
                if info.get("load_error"):
                    reasons.append(f"model failed to load: {info['load_error']}")
                    continue
            if slot.exited is not None:
                reasons.append(slot.exited)
            else:
                model = self.settings.models[0] if self.settings.models else ""
                reasons.append(f"loading model {model}".strip())
        return False, "; ".join(dict.fromkeys(reasons))

    def stop(self, grace_s: float) -> None:
        """SIGTERM every engine process (each finishes its batch within the grace, else hands it back), wait, then
        SIGKILL what is left, and let the launcher go."""
        with self._lock:
            self._stopping = True
        signalled: set[int] = set()
        deadline = time.monotonic() + grace_s + 35  # the runner's own stop: grace, then 30 s to hand back
        with self._lock:
            while any(slot.pid is not None for slot in self.slots) and time.monotonic() < deadline:
                for pid in {slot.pid for slot in self.slots if slot.pid is not None} - signalled:
                    signalled.add(pid)  # one that started just before stop() is told too
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
                self._exits.wait(min(0.5, deadline - time.monotonic()))
            left = [slot.pid for slot in self.slots if slot.pid is not None]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"was killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"was killed by signal {sig}"
    return f"exited with code {os.WEXITSTATUS(status)}"
