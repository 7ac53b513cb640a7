"""Holding up under abuse: load, soak and faults, each against real processes. `make bench-abuse` runs them.

  load     200 HTTP clients for 60 s against `sdserve serve` with the demo model and rate limits on (20 API
           keys from a keys file, 10 clients each): a mixed workload of native jobs and generate, A1111
           txt2img, OpenAI images and GET /?prompt=. Every status code is counted (target: no 5xx; the excess
           gets 429), /healthz is timed every 100 ms meanwhile (p50, p99), and the server's RSS is read before
           the load (after a warm-up), at its peak, and after the queue drains (target: growth < 10%).
  soak     10,000 jobs through `sdserve serve` with retention at a short setting: the data dir's size, the job
           table's rows and the RSS sampled every 2 s stay bounded and flat.
  faults   jobs accepted (a 2xx for an Idempotency-Key) and then lost or duplicated, target 0, across: kill -9
           of an API replica, kill -9 of a worker, kill -9 of Redis (restarted from its AOF), S3 gone for 10 s,
           and a full disk. A Redis/S3 cluster of 2 API replicas and 2 workers (noop engine, 50 ms a step) for
           the first four; an embedded server on a small tmpfs for the last.

Writes bench/results/abuse-<machine>.json and .png, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from components import RedisServer, SeaweedS3, fill_disk  # noqa: E402  (the tests' real servers, on free ports)
from run import RESULTS, Server, machine, pct  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def wait_drained(url: str, headers: dict, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = httpx.get(url + "/api/v1/jobs", params={"status": "running", "limit": 1}, headers=headers).json()
        depth = metric(httpx.get(url + "/metrics", headers=headers).text, "sdserve_queue_depth")
        if not running and depth == 0:
            return
        time.sleep(0.5)
    raise RuntimeError("the queue never drained")


# ---------------------------------------------------------------- load
def _requests(i: int, key: str) -> tuple[str, str, dict | None, dict | None]:
    """The mixed workload: client i's next request (method, path, json body, query)."""
    prompt = random.choice(["a red circle", "a blue square on a yellow background", "a small green star"])
    kind = i % 5
    if kind == 0:
        return "POST", "/api/v1/jobs", {"prompt": prompt, "steps": 8}, None
    if kind == 1:
        return "POST", "/api/v1/generate", {"prompt": prompt, "steps": 8}, None
    if kind == 2:
        return "POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 8, "width": 64, "height": 64}, None
    if kind == 3:
        return "POST", "/v1/images/generations", {"prompt": prompt, "size": "64x64", "response_format": "b64_json",
                                                   "steps": 8}, None
    return "GET", "/", None, {"prompt": prompt, "steps": "8"}


async def _clients(url: str, keys: list[str], clients: int, seconds: float, codes: Counter) -> None:
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        async def client(i: int) -> None:
            headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
            while time.monotonic() < stop:
                method, path, body, query = _requests(i, keys[i % len(keys)])
                try:
                    r = await asyncio.wait_for(c.request(method, path, json=body, params=query, headers=headers),
                                               max(0.1, stop - time.monotonic()))
                    codes[r.status_code] += 1
                    if r.status_code == 429:  # a caller over its limit, or the queue full for everyone
                        codes["429 rate limit" if "RateLimit-Limit" in r.headers else "429 queue full"] += 1
                        await asyncio.sleep(0.2)  # an impatient client: it does not wait for Retry-After
                except asyncio.TimeoutError:
                    codes["cut at the end"] += 1  # its synchronous call was still waiting when the run ended
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1

        await asyncio.gather(*(client(i) for i in range(clients)))


def _probe(url: str, seconds: float, out) -> None:
    """A kubelet's view: /healthz every 100 ms from a process of its own (not queued behind the load
    generator's own event loop), a fresh connection each time. Sends (latencies, failures) back."""
    latencies, failures = [], []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        started = time.perf_counter()
        try:
            r = httpx.get(url + "/healthz", timeout=10)
            if r.status_code != 200:
                failures.append(str(r.status_code))
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.1)
    out.send((latencies, failures))


def load(args, work: Path) -> dict:
    keys = [f"sk-load-{i:02d}-{os.urandom(4).hex()}" for i in range(20)]
    keys_file = work / "keys.toml"
    keys_file.write_text("".join(f'[[keys]]\nkey = "{k}"\nlabel = "team-{i:02d}"\n\n' for i, k in enumerate(keys)))
    folder = work / "load"
    folder.mkdir()
    server = Server(folder, "--keys-file", str(keys_file), "--rate-limit", args.rate_limit, "--rate-burst",
                    str(args.rate_burst), "--images-per-minute", str(args.images_per_minute)).start()
    server.wait_ready()
    headers = {"Authorization": f"Bearer {keys[0]}"}
    print("  load: warm-up (20 clients, 15 s)", flush=True)
    asyncio.run(_clients(server.url, keys, 20, 15, Counter()))
    wait_drained(server.url, headers)
    time.sleep(2)
    before = rss_mb(server.proc.pid)
    codes: Counter = Counter()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], rss_mb(server.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(f"  load: {args.clients} clients for {args.seconds:.0f} s", flush=True)
    started = time.perf_counter()

    receiver, sender = multiprocessing.Pipe(duplex=False)
    probe = multiprocessing.Process(target=_probe, args=(server.url, args.seconds, sender))
    probe.start()
    asyncio.run(_clients(server.url, keys, args.clients, args.seconds, codes))
    latencies, failures = receiver.recv()
    probe.join()
    wall = time.perf_counter() - started
    wait_drained(server.url, headers)
    time.sleep(5)
    done.set()
    after = rss_mb(server.proc.pid)
    metrics = httpx.get(server.url + "/metrics", headers=headers).text
    images = metric(metrics, "sdserve_images_total")
    server.stop()
    counts = {str(k): v for k, v in sorted(codes.items(), key=lambda kv: str(kv[0]))}
    server_errors = sum(v for k, v in codes.items() if isinstance(k, int) and k >= 500)
    result = {
        "clients": args.clients, "seconds": args.seconds, "wall_s": wall, "keys": len(keys),
        "limits": {"rate_limit": args.rate_limit, "rate_burst": args.rate_burst,
                   "images_per_minute": args.images_per_minute},
        "responses": counts, "5xx": server_errors, "429": codes.get(429, 0),
        "429_rate_limit": codes.get("429 rate limit", 0), "429_queue_full": codes.get("429 queue full", 0),
        "ok": sum(v for k, v in codes.items() if isinstance(k, int) and 200 <= k < 300),
        "healthz_p50_ms": statistics.median(latencies) * 1000, "healthz_p99_ms": pct(latencies, 0.99) * 1000,
        "healthz_max_ms": max(latencies) * 1000, "healthz_samples": len(latencies), "healthz_failures": failures,
        "rss_before_mb": before, "rss_peak_mb": peak[0], "rss_after_drain_mb": after,
        "rss_growth": after / before - 1, "images_made": images,
    }
    print(f"  load: {result['ok']} ok, {result['429']} x 429 ({result['429_rate_limit']} rate limit), {server_errors} x 5xx; /healthz p50 "
          f"{result['healthz_p50_ms']:.1f} ms, p99 {result['healthz_p99_ms']:.1f} ms; RSS {before:.0f} -> peak "
          f"{peak[0]:.0f} -> {after:.0f} MB after drain ({result['rss_growth']:+.1%})", flush=True)
    return result


# ---------------------------------------------------------------- soak
def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def soak(args, work: Path) -> dict:
    folder = work / "soak"
    folder.mkdir()
    keep_s = args.keep_s
    env = {"SDSERVE_KEEP_JOBS_DAYS": str(keep_s / 86400), "SDSERVE_KEEP_IMAGES_DAYS": str(keep_s / 86400),
           "SDSERVE_PRUNE_INTERVAL_S": "2"}
    model = ["--model", args.soak_model] if args.soak_model != "noop" else []
    if args.soak_model == "noop":
        env["SDSERVE_ENGINE"] = "noop"
    server = Server(folder, *model, "--max-queue", "2000", "--max-batch", "16", env=env).start()
    server.wait_ready()
    samples: list[dict] = []
    done = threading.Event()
    db = folder / "jobs.db"

    def sample() -> None:
        started = time.monotonic()
        while not done.wait(2):
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            samples.append({"t_s": round(time.monotonic() - started, 1), "disk_mb": du(folder) / 2**20,
                            "job_rows": rows, "rss_mb": rss_mb(server.proc.pid)})

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    accepted = [0]
    refused = Counter()
    lock = threading.Lock()
    per_client = args.jobs // 16

    def client(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            sent = 0
            while sent < per_client:
                r = c.post("/api/v1/jobs", json={"prompt": f"soak {k} {sent}", "steps": args.soak_steps})
                if r.status_code == 202:
                    sent += 1
                    with lock:
                        accepted[0] += 1
                else:
                    with lock:
                        refused[r.status_code] += 1
                    time.sleep(float(r.headers.get("Retry-After", "1")) / 4)
                time.sleep(1 / args.soak_rate * 16)

    print(f"  soak: {args.jobs} jobs at up to {args.soak_rate}/s, retention {keep_s:.0f} s", flush=True)
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_drained(server.url, {})
    time.sleep(keep_s + 5)  # one more retention period: what is left is what it keeps
    done.set()
    sampler.join()
    wall = time.perf_counter() - started
    metrics = httpx.get(server.url + "/metrics").text
    ended = metric(metrics, "sdserve_jobs_total")
    server.stop()
    quarter = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 4]
    result = {
        "jobs": accepted[0], "refused": dict(refused), "ended": ended, "wall_s": wall, "keep_s": keep_s,
        "engine": args.soak_model, "samples": samples,
        "disk_max_mb": max(s["disk_mb"] for s in samples), "disk_end_mb": samples[-1]["disk_mb"],
        "rows_max": max(s["job_rows"] for s in samples), "rows_end": samples[-1]["job_rows"],
        "rss_first_quarter_mb": quarter[0]["rss_mb"], "rss_end_mb": samples[-1]["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in samples),
    }
    print(f"  soak: {accepted[0]} jobs in {wall:.0f} s; job rows max {result['rows_max']}, end "
          f"{result['rows_end']}; disk max {result['disk_max_mb']:.1f} MB, end {result['disk_end_mb']:.1f} MB; RSS "
          f"{result['rss_first_quarter_mb']:.0f} -> {result['rss_end_mb']:.0f} MB", flush=True)
    return result


# ---------------------------------------------------------------- faults
class Submitter:
    """Submits jobs at a steady rate, each with its own Idempotency-Key, to the API replicas in turn; a
    submission that fails (connection refused, 5xx, 503) is retried with the same key, on the next replica,
    until accepted, as a careful client does. Accepted: the key got a 2xx."""

    def __init__(self, urls: list[str], rate: float, clients: int = 0, body: dict | None = None) -> None:
        """`clients` > 0: that many closed-loop clients instead of a steady rate, each submitting its next job
        once its last one ended (as 16 people at a UI do), so batches form on the real engine."""
        self.urls = urls
        self.rate = rate
        self.clients = clients
        self.body = body or {"steps": 10}
        self.accepted: dict[str, str] = {}  # idempotency key -> job id
        self.retries = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(max(1, clients))]
        self._turn = 0

    def start(self) -> Submitter:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _submit(self, c: httpx.Client, key: str) -> str | None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            url = self.urls[self._turn % len(self.urls)]
            self._turn += 1
            try:
                r = c.post(url + "/api/v1/jobs", json={"prompt": key, **self.body}, headers={"Idempotency-Key": key})
                if r.status_code in (200, 202):
                    self.accepted[key] = r.json()["id"]
                    return self.accepted[key]
                self.retries[str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                self.retries[type(exc).__name__] += 1
            time.sleep(0.2)
        return None

    def _until_ended(self, c: httpx.Client, job_id: str) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            url = self.urls[self._turn % len(self.urls)]
            self._turn += 1
            try:
                if c.get(f"{url}/api/v1/jobs/{job_id}").json().get("status") in TERMINAL:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)

    def _run(self, client: int) -> None:
        with httpx.Client(timeout=10) as c:
            n = 0
            while not self._stop.is_set():
                key = f"fault-{client:02d}-{n:05d}-{os.urandom(3).hex()}"
                n += 1
                job_id = self._submit(c, key)
                if self.clients and job_id is not None:
                    self._until_ended(c, job_id)
                elif not self.clients:
                    time.sleep(1 / self.rate)


def settle(urls: list[str], accepted: dict[str, str], timeout: float = 180) -> dict[str, dict]:
    """Every accepted job's record once all have ended (or the timeout passed), read from any live replica."""
    deadline = time.monotonic() + timeout
    jobs: dict[str, dict] = {}
    while True:
        for key, job_id in accepted.items():
            if jobs.get(key, {}).get("status") in TERMINAL:
                continue
            for url in urls:
                try:
                    r = httpx.get(f"{url}/api/v1/jobs/{job_id}", timeout=10)
                    jobs[key] = r.json() if r.status_code == 200 else {"status": f"missing ({r.status_code})"}
                    break
                except httpx.HTTPError:
                    continue
        if all(j.get("status") in TERMINAL for j in jobs.values()) or time.monotonic() > deadline:
            return jobs
        time.sleep(1)


def tally(name: str, submitter: Submitter, jobs: dict[str, dict], all_jobs: list[dict],
          stored: Counter | None, **extra) -> dict:
    """Lost: an accepted job missing, or not ended. Duplicated: a key with more than one job record (its prompt
    is the key), or a job with more images stored than it made."""
    statuses = Counter(j.get("status") for j in jobs.values())
    lost = sum(1 for j in jobs.values() if j.get("status") not in TERMINAL)
    records = Counter(j["request"]["prompt"] for j in all_jobs if j["request"]["prompt"] in submitter.accepted)
    duplicate_records = sum(c - 1 for c in records.values() if c > 1)
    duplicate_images = 0
    if stored is not None:
        for j in jobs.values():
            if j.get("status") == "succeeded":
                duplicate_images += max(0, stored.get(j["id"], 0) - len(j["images"]))
    failed = Counter(f"{j.get('error_kind')}: {j.get('error', '')[:80]}" for j in jobs.values()
                     if j.get("status") == "failed")
    result = {"accepted": len(submitter.accepted), "statuses": dict(statuses), "lost": lost,
              "duplicated": duplicate_records + duplicate_images, "duplicate_records": duplicate_records,
              "duplicate_images": duplicate_images, "rerun_jobs": sum(1 for j in jobs.values()
                                                                      if j.get("attempts", 1) > 1),
              "failed": dict(failed), "client_retries": dict(submitter.retries), **extra}
    print(f"  {name}: {result['accepted']} accepted, {dict(statuses)}, lost {lost}, duplicated "
          f"{result['duplicated']}, re-run {result['rerun_jobs']}, client retries {dict(submitter.retries)}",
          flush=True)
    return result


def list_all(url: str) -> list[dict]:
    jobs, offset = [], 0
    while True:
        page = httpx.get(url + "/api/v1/jobs", params={"limit": 200, "offset": offset}, timeout=30).json()
        jobs += page
        if len(page) < 200:
            return jobs
        offset += 200


def stored_images(s3: SeaweedS3, bucket: str, prefix: str) -> Counter:
    counts: Counter = Counter()
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"].rsplit("/", 1)[-1].removesuffix(".png")
            if "-" in name:
                counts[name.split("-")[0]] += 1
    return counts


def faults(args, work: Path) -> dict:
    out: dict = {}
    redis = RedisServer(work / "redis", "--appendfsync", "always").start()
    s3 = SeaweedS3(work / "s3").start()
    bucket = s3.bucket("abuse")
    noop = {"SDSERVE_ENGINE": "noop", "SDSERVE_NOOP_STEP_MS": "50", **s3.env}
    try:
        for db, scenario in enumerate(("api", "worker", "redis", "s3", "redis-real"), start=1):
            if args.scenarios and scenario not in args.scenarios:
                continue
            # redis-real: the demo model on the real engine, 16 closed-loop clients, so batches are computing
            # when Redis dies (the no-op engine's steps are too short to meet the outage).
            real = scenario == "redis-real"
            env = {**s3.env} if real else noop
            prefix = f"{scenario}/images"
            common = ("--queue", redis.url.rsplit("/", 1)[0] + f"/{db}",
                      "--storage", f"s3://{bucket}/{prefix}?endpoint_url={s3.endpoint}&region=us-east-1")

            def folder(name: str) -> Path:
                path = work / f"{scenario}-{name}"
                path.mkdir(exist_ok=True)
                return path

            apis = [Server(folder(f"api{i}"), *common, role="api", env=env) for i in range(2)]
            workers = [Server(folder(f"w{i}"), *common, "--name", f"w{i}", "--lease-s", "5",
                              "--max-batch", "16" if real else "8", role="worker", env=env) for i in range(2)]
            for p in (*apis, *workers):
                p.start()
            for p in (*apis, *workers):
                p.wait_ready()
            urls = [a.url for a in apis]
            submitter = (Submitter(urls, 0, clients=16, body={"steps": 30}) if real
                         else Submitter(urls, args.fault_rate)).start()
            time.sleep(5)
            extra: dict = {}
            if scenario == "api":  # kill -9 one replica, bring it back 3 s later
                apis[0].proc.kill()
                apis[0].proc.wait()
                time.sleep(3)
                apis[0].start()
                apis[0].wait_ready()
            elif scenario == "worker":  # kill -9 a worker mid-batch; its jobs come back after the 5 s lease
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(
                        j["worker"] == "w0" for j in httpx.get(urls[1] + "/api/v1/jobs",
                                                               params={"status": "running"}).json()):
                    time.sleep(0.01)
                extra["killed_holding"] = [j["id"] for j in httpx.get(
                    urls[1] + "/api/v1/jobs", params={"status": "running"}).json() if j["worker"] == "w0"]
                workers[0].proc.kill()
                workers[0].proc.wait()
                time.sleep(3)
                workers[0].start()
            elif scenario in ("redis", "redis-real"):  # kill -9 Redis; 3 s later it restarts from its AOF
                if real:  # while batches compute: wait for a job past its first step
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and not any(
                            j["step"] >= 1 for j in httpx.get(urls[0] + "/api/v1/jobs",
                                                              params={"status": "running"}).json()):
                        time.sleep(0.05)
                    extra["running_at_kill"] = len(httpx.get(urls[0] + "/api/v1/jobs",
                                                             params={"status": "running"}).json())
                redis.kill()
                time.sleep(3)
                redis.start()
            else:  # S3 gone (connections refused) for 10 s
                s3.stop()
                went = time.monotonic()
                time.sleep(10)
                s3.start()
                extra["s3_down_s"] = time.monotonic() - went
            time.sleep(8)
            submitter.stop()
            jobs = settle(urls, submitter.accepted)
            out[scenario] = tally(scenario, submitter, jobs, list_all(urls[0]), stored_images(s3, bucket, prefix),
                                  **extra)
            for p in (*workers, *apis):
                if p.proc.poll() is None:
                    p.stop()
        if not args.scenarios or "disk_full" in args.scenarios:
            out["disk_full"] = disk_full(args, work)
    finally:
        s3.stop()
        redis.stop()
    return out


def disk_full(args, work: Path) -> dict:
    mount = work / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        print(f"  disk_full: skipped, cannot mount a tmpfs: {done.stderr.decode().strip()}", flush=True)
        return {"skipped": done.stderr.decode().strip()}
    try:
        logs = work / "disk-full"
        logs.mkdir()
        server = Server(logs, "--max-batch", "8", env={"SDSERVE_ENGINE": "noop", "SDSERVE_NOOP_STEP_MS": "50"})
        server.cmd[server.cmd.index("--data-dir") + 1] = str(mount)  # its log stays off the full disk
        server.start()
        server.wait_ready()
        submitter = Submitter([server.url], args.fault_rate).start()
        time.sleep(5)
        filler = fill_disk(mount)
        time.sleep(5)
        readiness = httpx.get(server.url + "/readyz").json()
        filler.unlink()
        time.sleep(8)
        submitter.stop()
        jobs = settle([server.url], submitter.accepted)
        result = tally("disk_full", submitter, jobs, list_all(server.url), None,
                       readyz_while_full=readiness.get("reason"))
        server.stop()
        return result
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ---------------------------------------------------------------- report
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("load", "soak", "faults") if p in results]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, part in zip(axes[0], panels):
        r = results[part]
        if part == "load":
            codes = {k: v for k, v in r["responses"].items() if not k.startswith("429 ")}
            ax.bar(list(codes), list(codes.values()), color=["#c33" if k.startswith("5") else
                                                             "#e90" if k == "429" else "#38c" for k in codes])
            ax.set_yscale("log")
            ax.set_title(f"load: {r['clients']} clients, {r['seconds']:.0f} s\n/healthz p99 "
                         f"{r['healthz_p99_ms']:.0f} ms; RSS after drain {r['rss_growth']:+.1%}", fontsize=9)
            ax.set_ylabel("responses")
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        elif part == "soak":
            t = [s["t_s"] for s in r["samples"]]
            ax.plot(t, [s["job_rows"] for s in r["samples"]], label="job rows")
            ax.set_ylabel("job rows")
            twin = ax.twinx()
            twin.plot(t, [s["disk_mb"] for s in r["samples"]], color="#e90", label="data dir MB")
            twin.plot(t, [s["rss_mb"] for s in r["samples"]], color="#3a3", label="RSS MB")
            twin.set_ylabel("MB")
            ax.set_xlabel("seconds")
            ax.set_title(f"soak: {r['jobs']} jobs, retention {r['keep_s']:.0f} s", fontsize=9)
            fig.legend(loc="upper right", fontsize=7)
        else:
            names = [k for k in r if isinstance(r[k], dict) and "accepted" in r[k]]
            ax.bar(names, [r[k]["accepted"] for k in names], color="#38c", label="accepted")
            ax.bar(names, [r[k]["lost"] + r[k]["duplicated"] for k in names], color="#c33",
                   label="lost + duplicated")
            ax.set_title("faults: accepted jobs lost or duplicated", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(f"sdserve under abuse, {results['machine']['label']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help="load, soak, faults (default: all)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate-limit", default="1/s")
    parser.add_argument("--rate-burst", type=float, default=3)
    parser.add_argument("--images-per-minute", type=float, default=60)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--soak-rate", type=float, default=100, help="jobs/s the soak's clients submit at most")
    parser.add_argument("--soak-steps", type=int, default=2)
    parser.add_argument("--soak-model", default="noop", help="noop (the control plane) or a model, e.g. demo")
    parser.add_argument("--keep-s", type=float, default=20, help="the soak's retention, seconds")
    parser.add_argument("--fault-rate", type=float, default=10, help="jobs/s submitted during each fault")
    parser.add_argument("--scenarios", nargs="*", default=None,
                        help="faults to run (api worker redis s3 redis-real; default: all, then the full disk)")
    parser.add_argument("--name", default=None, help="results file name; an existing file keeps the parts not run")
    args = parser.parse_args()
    parts = {"load", "soak", "faults"}
    args.parts = args.parts or ["load", "soak", "faults"]
    if not set(args.parts) <= parts:
        parser.error(f"unknown part(s): {', '.join(sorted(set(args.parts) - parts))}")
    work = Path(tempfile.mkdtemp(prefix="sdserve-abuse-"))
    results: dict = {"machine": machine("cpu"), "command": " ".join(sys.argv)}
    print(f"sdserve abuse bench on {results['machine']['label']} (work dir {work})", flush=True)
    for part in args.parts:
        results[part] = {"load": load, "soak": soak, "faults": faults}[part](args, work)
    name = args.name or "abuse-" + re.sub(r"[^a-z0-9]+", "-", results["machine"]["label"].lower()).strip("-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    if path.exists():  # a part run again replaces its own figures only (a fault: its own scenario's)
        earlier = json.loads(path.read_text())
        if "faults" in results and "faults" in earlier:
            results["faults"] = {**earlier["faults"], **results["faults"]}
        results = {**earlier, **results}
    path.write_text(json.dumps(results, indent=2))
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and .png")


if __name__ == "__main__":
    main()
