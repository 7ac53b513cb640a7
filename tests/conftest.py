from __future__ import annotations

import os

# No test may touch the network: the hub client must fail fast instead of trying to download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import save_diffusers, save_single_file  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """models/ with a tiny diffusers folder, the same weights as one .safetensors file, and its configs."""
    root = tmp_path_factory.mktemp("models")
    pipe = save_diffusers(root / "tiny")
    save_single_file(pipe, root / "tinyfile.safetensors")
    # Offline, single-file loading takes configs and tokenizer from a local folder of the same architecture.
    shutil.copytree(root / "tiny", root / "configs" / "sd1")
    return root


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory) -> Path:
    """One compile cache for every server and registry of the session (as replicas on a shared volume would have):
    each model is traced for OpenVINO once per session, not once per server."""
    folder = tmp_path_factory.mktemp("compiled")
    os.environ["SDSERVE_COMPILE_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def registry(models_dir, data_dir, compile_cache):
    from sdserve.engine.models import ModelRegistry

    return ModelRegistry(models_dir, data_dir, extra=[str(models_dir / "tiny")], device="cpu", max_loaded=2,
                         compile_cache=compile_cache)


@pytest.fixture(scope="session")
def engine(registry):
    from sdserve.engine.pipeline import Engine

    return Engine(registry)


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    """An S3 server (SeaweedFS's `weed server -s3`) on free loopback ports, with one identity; stopped by PID."""
    from components import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Debian's redis-server with --appendonly yes, on a free loopback port; stopped by PID."""
    from components import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def make_queue(request, tmp_path):
    """The one backend parametrization of the queue contracts: opens a job queue on each backend (a SQLite file;
    a flushed database on the real redis-server) with the test's own bounds (`max_queue`, ...)."""
    opened = []

    def make(**kwargs):
        if request.param == "sqlite":
            from sdserve.jobs.local import SQLiteJobQueue

            queue = SQLiteJobQueue(tmp_path / "jobs.db", **kwargs)
        else:
            from sdserve.jobs.redis import RedisJobQueue

            server = request.getfixturevalue("redis_server")
            if not opened:  # a second queue in one test is a second replica on the same data
                server.client().flushdb()
            queue = RedisJobQueue(server.url, **kwargs)
        opened.append(queue)
        return queue

    make.backend = request.param
    yield make
    for queue in opened:
        queue.close()


def _server_factory(folder):
    """Starts `sdserve` processes (tests/server.py ServerProcess) and stops every one it started, newest first.
    `data`: a name (a new folder for its data) or a path."""
    started = []

    def start(models_dir, data, *args, **kwargs):
        from server import ServerProcess

        proc = ServerProcess(models_dir, folder(data) if isinstance(data, str) else data, *args, **kwargs)
        started.append(proc)
        return proc.start()

    def stop_all():
        for proc in reversed(started):
            if proc.proc is not None:  # it got as far as its process
                proc.terminate()

    return start, stop_all


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory):
    """The one server factory, for servers a module's tests share."""
    start, stop_all = _server_factory(tmp_path_factory.mktemp)
    yield start
    stop_all()


@pytest.fixture()
def servers(tmp_path):
    """The one server factory, for a test's own servers."""
    start, stop_all = _server_factory(lambda name: tmp_path / name)
    yield start
    stop_all()
