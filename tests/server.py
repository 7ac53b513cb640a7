"""A real `sdserve serve` (or `api`, or `worker`) process on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from zygote import Zygote, ZygoteGone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_ENGINE = str(Path(__file__).resolve().parent / "no_engine")


class ServerProcess:
    def __init__(self, models_dir: Path | None, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 port: int | None = None, role: str = "serve", command: list[str] | None = None) -> None:
        """A `sdserve serve`, `api` or `worker` process. With models_dir None, only `args` choose the model
        (e.g. --sagemaker); port can come from the env. An `api` runs with torch and diffusers unimportable
        (tests/no_engine), as in a slim API image; a worker's url is its probe port (/readyz, /metrics).
        `command`: run exactly this (e.g. the container's entry point) instead; `port` is where it listens."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log_path = data_dir / f"{role}-{self.port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.cmd = [sys.executable, "-m", "sdserve.cli", role, "--host", "127.0.0.1", "--data-dir", str(data_dir)]
        if role != "api":
            self.cmd += ["--device", "cpu"]
        if port is None:
            self.cmd += ["--metrics-port" if role == "worker" else "--port", str(self.port)]
        if models_dir is not None:
            self.cmd += ["--models-dir", str(models_dir), "--model", "tiny"]
        self.cmd += list(args)
        if command is not None:
            assert port is not None, "a given command needs the port it listens on"
            self.cmd = command
        self.env = {**os.environ, **(env or {})}
        if role == "api":
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [NO_ENGINE, self.env.get("PYTHONPATH")]))
        self.proc: subprocess.Popen | None = None

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to be ready: forked from the test zygote (tests/zygote.py) where
        it can be, else as a new interpreter."""
        self._log = self.log_path.open("ab")
        zygote = Zygote.shared() if self.cmd[1:3] == ["-m", "sdserve.cli"] else None
        if zygote is not None and zygote.can_run(self.env):
            try:
                self.proc = zygote.spawn(self.cmd[2:], self.env, str(self.log_path))
                return self
            except ZygoteGone:
                pass  # said once on stderr; start it as a new interpreter
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def start(self, timeout: float = 120) -> ServerProcess:
        return self.launch().wait_ready(timeout)

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (graceful), then SIGKILL if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the server can tell."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)


def until(condition, what: str, timeout: float = 300, *processes: ServerProcess, every: float = 0.05):
    """The one wait of the tests: by state, until `condition()` is truthy (and every process still runs). `timeout`
    only guards against a hang: generous, since a busy machine may take minutes where an idle one takes seconds.
    `what`: a string, or a function giving one, for the failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for p in processes:
            assert p.proc.poll() is None, f"{p.cmd[3]} exited:\n{p.log()[-3000:]}"
        assert time.monotonic() < deadline, f"{what() if callable(what) else what}: not within {timeout} s"
        time.sleep(every)


def wait_for(client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "canceled"), timeout: float = 300,
             predicate=None) -> dict:
    """The job once it reaches one of `statuses` (and `predicate`)."""
    seen: list[dict] = [{}]

    def reached() -> dict | None:
        seen[0] = job = client.get(f"/api/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses and (predicate is None or predicate(job)) else None

    return until(reached, lambda: f"job {job_id} did not reach {statuses}: {seen[0]}", timeout)
