"""Starts test servers by fork from one process that has already imported sdserve, torch and diffusers.

A server's start is mostly importing torch, diffusers and transformers (about 5 s on a fast machine, 10 s on a slow
one), and the suite starts about 80 of them. The zygote pays that once: it imports everything a `serve` or `worker`
process imports, and for each server forks a child that takes the server's argv, environment, working directory and
log file and runs `python -m sdserve.cli` as a fresh process would. Only imports are shared: the zygote runs no
torch op, starts no thread and opens no file a child keeps, so each child begins where a new interpreter would be
once its imports are done.

The child is forked twice so it is orphaned at once and adopted by the test process, which makes itself a child
subreaper (prctl PR_SET_CHILD_SUBREAPER): the test process can then wait for it, signal it and read its exit status
as with any subprocess (ForkedProcess mirrors the subprocess.Popen methods the tests use).

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
    import torch  # noqa: F401
    from diffusers import (  # noqa: F401
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    import sdserve.api.app  # noqa: F401
    import sdserve.cli  # noqa: F401
    import sdserve.engine.models  # noqa: F401
    import sdserve.engine.pipeline  # noqa: F401
    import sdserve.jobs.local  # noqa: F401
    import sdserve.jobs.redis  # noqa: F401
    import sdserve.jobs.runner  # noqa: F401
    import sdserve.service  # noqa: F401


def _serve(sock: socket.socket) -> dict:
    """Answers fork requests until the test process closes the socket. Returns (in the server child only) the
    request the child is to run."""
    reader = sock.makefile("rb")
    for line in reader:
        request = json.loads(line)
        ours, theirs = os.pipe()
        middle = os.fork()
        if middle == 0:  # the intermediate: fork the server, say its pid, exit so the server is orphaned
            os.close(ours)
            child = os.fork()
            if child == 0:
                os.close(theirs)
                reader.close()
                sock.close()
                return request
            os.write(theirs, str(child).encode())
            os._exit(0)
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

    runpy.run_module("sdserve.cli", run_name="__main__", alter_sys=True)


# ----- the test process's side -------------------------------------------------------------------------------------
class ForkedProcess:
    """A server forked by the zygote and adopted by this process: the subprocess.Popen methods the tests use."""

    def __init__(self, pid: int, args: list[str]) -> None:
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


class Zygote:
    _lock = threading.Lock()
    _instance: Zygote | None = None

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
        self.sock = ours
        self.reader = ours.makefile("rb")
        self.env_at_start = dict(os.environ)
        atexit.register(self.close)
        if json.loads(self.reader.readline() or b"{}").get("ready") is not True:
            raise RuntimeError("the test zygote did not start; see its error above")

    @classmethod
    def shared(cls) -> Zygote | None:
        """The one zygote of this test session, started on first use; None with SDSERVE_TEST_SPAWN=1."""
        if os.environ.get("SDSERVE_TEST_SPAWN") == "1":
            return None
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def can_run(self, env: dict[str, str]) -> bool:
        """Whether a child can run in `env`: what is read at import time (the module path) must be the zygote's."""
        return env.get("PYTHONPATH") == self.env_at_start.get("PYTHONPATH")

    def spawn(self, args: list[str], env: dict[str, str], log: str) -> ForkedProcess:
        """`python -m sdserve.cli <args>` in `env`, writing to `log`; args start with "sdserve.cli"."""
        with self._lock:
            request = {"args": args, "env": env, "log": log, "cwd": os.getcwd()}
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            pid = json.loads(self.reader.readline())["pid"]
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
