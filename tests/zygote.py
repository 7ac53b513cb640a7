"""Starts test servers by fork from one process that has already imported sdserve, torch and diffusers.

A server's start is mostly importing torch, diffusers and transformers (about 5 s on a fast machine, 10 s on a slow
one), and the suite starts about 80 of them. The zygote pays that once: it imports everything a `serve` or `worker`
process imports, and for each server forks a child that takes the server's argv, environment, working directory and
log file and runs `python -m sdserve.cli` as a fresh process would. Only imports are shared: the zygote runs no
torch op, starts no thread and opens no file a child keeps, so each child begins where a new interpreter would be
once its imports are done.

The child is forked twice so it is orphaned at once and adopted by the test process, which makes itself a child
subreaper (prctl PR_SET_CHILD_SUBREAPER): the test process can then wait for it, signal it and read its exit status
as with any subprocess (ForkedProcess mirrors the subprocess.Popen methods the tests use). Being a subreaper, it
also adopts other orphans (Chromium's helpers, say) that then stay zombies until the session ends: harmless, as
every wait in the tests is for one pid.

`SDSERVE_TEST_SPAWN=1` starts every server as its own interpreter instead, as before. API processes always are: they
run with torch unimportable (tests/no_engine), as in a slim API image.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

PR_SET_CHILD_SUBREAPER = 36


# ----- the zygote process ------------------------------------------------------------------------------------------
def _preload() -> None:
    """What a serve or worker process imports before its first job (measured: a load adds only a few modules)."""
    from sdserve.engine import preload

    preload()
    import sdserve.api.app  # noqa: F401
    import sdserve.cli  # noqa: F401
    import sdserve.jobs.local  # noqa: F401
    import sdserve.jobs.redis  # noqa: F401
    import sdserve.supervisor  # noqa: F401


def _serve(sock: socket.socket) -> dict:
    """Answers fork requests until the test process closes the socket. Returns (in the server child only) the
    request the child is to run."""
    reader = sock.makefile("rb")
    for line in reader:
        request = json.loads(line)
        ours, theirs = os.pipe()
        middle = os.fork()
        if middle == 0:  # the intermediate: fork the server, say its pid, exit so the server is orphaned
            code = 1
            try:
                os.close(ours)
                child = os.fork()
                if child == 0:
                    os.close(theirs)
                    reader.close()
                    sock.close()
                    code = None
                    return request
                os.write(theirs, str(child).encode())
                code = 0
            finally:
                if code is not None:  # whatever happened, the intermediate never returns into the zygote's loop
                    os._exit(code)
        os.close(theirs)
        os.waitpid(middle, 0)
        with os.fdopen(ours, "rb") as pipe:
            pid = int(pipe.read() or b"0")
        sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    os._exit(0)


def _become(request: dict) -> None:
    """Turn this child into the server process the request describes: its fds, env, cwd, sys.path and argv. (Its
    signal handlers are a new interpreter's already: the zygote changes none. The random module reseeds itself in
    a forked child.)"""
    devnull = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, 1 << 16)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # as `python -m` has it (the zygote's is tests/)
    sys.argv = list(request["args"])  # runpy puts the module's file in argv[0]


def _zygote_main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    _preload()
    sock.sendall(b'{"ready": true}\n')
    request = _serve(sock)
    _become(request)
    import runpy

    sys.modules.pop("sdserve.cli", None)  # as in `python -m`, the module runs once, as __main__
    runpy.run_module("sdserve.cli", run_name="__main__", alter_sys=True)


# ----- the test process's side -------------------------------------------------------------------------------------
class ForkedProcess:
    """A server forked by the zygote and adopted by this process: the subprocess.Popen methods the tests use."""

    def __init__(self, pid: int, args: list[str]) -> None:
        assert pid > 0, pid  # waitpid(0) or kill(0) would reach the test process's whole group
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it is gone, its status unknown
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# Environment variables read when the interpreter starts or a library is imported: a child whose environment
# differs in these from the zygote's starts as a new interpreter.
IMPORT_TIME_ENV = ("PYTHON", "LC_", "OMP_", "MKL_", "TORCH", "CUDA", "HF_", "TRANSFORMERS_", "DIFFUSERS_",
                   "TOKENIZERS_")


class ZygoteGone(RuntimeError):
    pass


class Zygote:
    _lock = threading.RLock()
    _instance: Zygote | None = None
    _broken = False

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
        )
        theirs.close()
        ours.settimeout(300)  # its imports, on a slow and busy machine; a fork answers in milliseconds
        self.sock = ours
        self.reader = ours.makefile("rb")
        self.env_at_start = dict(os.environ)
        atexit.register(self.close)
        self._answer("ready")

    def _answer(self, key: str):
        """The zygote's next answer's `key`; ZygoteGone if it died, hung or answered nonsense."""
        try:
            value = json.loads(self.reader.readline() or b"{}").get(key)
        except (OSError, ValueError) as exc:
            raise ZygoteGone(f"the test zygote did not answer: {exc}") from exc
        if not value:
            raise ZygoteGone(f"the test zygote did not answer (exit status {self.proc.poll()}); see its error above")
        return value

    @classmethod
    def shared(cls) -> Zygote | None:
        """The one zygote of this test session, started on first use; None with SDSERVE_TEST_SPAWN=1."""
        if os.environ.get("SDSERVE_TEST_SPAWN") == "1" or cls._broken:
            return None
        with cls._lock:
            if cls._instance is None:
                try:
                    cls._instance = cls()
                except ZygoteGone as exc:
                    cls.give_up(exc)
            return cls._instance

    @classmethod
    def give_up(cls, reason: Exception) -> None:
        """No zygote for the rest of the session: servers start as new interpreters (slower, as correct)."""
        print(f"\ntests/zygote.py: {reason}; servers start as new interpreters from now on", file=sys.stderr)
        cls._broken, cls._instance = True, None

    def can_run(self, env: dict[str, str]) -> bool:
        """Whether a child can run in `env`: what is read at interpreter start or import time (the module path,
        Python's own settings, locale, thread pools, the hub and library settings) must be the zygote's."""
        def at_import(e: dict[str, str]) -> dict[str, str]:
            return {k: v for k, v in e.items() if k.startswith(IMPORT_TIME_ENV) or k in ("LANG", "TZ")}

        return at_import(env) == at_import(self.env_at_start)

    def spawn(self, args: list[str], env: dict[str, str], log: str) -> ForkedProcess:
        """`python -m sdserve.cli <args>` in `env`, writing to `log`; args start with "sdserve.cli". Raises
        ZygoteGone (after giving up on it) if the zygote cannot fork."""
        with self._lock:
            request = {"args": args, "env": env, "log": log, "cwd": os.getcwd()}
            try:
                self.sock.sendall(json.dumps(request).encode() + b"\n")
                pid = self._answer("pid")
            except (OSError, ZygoteGone) as exc:
                Zygote.give_up(exc)
                raise ZygoteGone(str(exc)) from exc
        return ForkedProcess(pid, [sys.executable, "-m", *args])

    def close(self) -> None:
        """The zygote exits when its socket closes; the servers it forked are the tests' to stop."""
        self.reader.close()
        self.sock.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


if __name__ == "__main__":
    _zygote_main()
