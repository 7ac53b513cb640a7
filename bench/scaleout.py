"""Scale-out benchmarks on a real redis-server, side by side in one run. `make bench-scaleout` runs them.

  workers        images/s with 2 workers over 1 worker on one Redis queue: `sdserve worker` processes, each
                 on one torch thread, behind one `sdserve api` replica; the demo model at 64x64, 20 steps,
                 16 closed-loop HTTP clients.
  controlplane   jobs/s with the no-op engine: 2 `sdserve api` replicas and a no-op worker on Redis (clients
                 spread round-robin over the replicas) against the embedded path (`sdserve serve`, SQLite),
                 the same load generator.
  recovery       seconds from kill -9 of the worker holding a job to the job finishing on the other
                 worker, against the lease.

Writes bench/results/scaleout-<machine>.json and .png, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from components import RedisServer  # noqa: E402  (the tests' real redis-server, started on a free port)
from run import RESULTS, Server, _control_plane, machine, run_clients  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Cluster:
    apis: list[Server]
    workers: list[Server]

    @property
    def urls(self) -> list[str]:
        return [a.url for a in self.apis]

    def stop(self) -> None:
        for process in (*self.workers, *self.apis):
            if process.proc.poll() is None:
                process.stop()
        if self in RUNNING:
            RUNNING.remove(self)


RUNNING: list[Cluster] = []  # stopped on the way out, whatever failed


def cluster(work: Path, redis: RedisServer, apis: int, workers: int, *worker_args: str, api_args: tuple = (),
            env: dict | None = None, db: int = 0) -> Cluster:
    """`apis` API replicas and `workers` workers (named w0, w1, ...) on Redis database `db`."""
    import redis as redis_py

    url = redis.url.rsplit("/", 1)[0] + f"/{db}"
    redis_py.Redis.from_url(url).flushdb()
    common = ("--queue", url, "--storage", f"file://{work / f'images-{db}'}")

    def folder(name: str) -> Path:
        path = work / f"{name}-{db}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    started = Cluster(
        [Server(folder(f"api{i}"), *common, *api_args, role="api").start() for i in range(apis)],
        [Server(folder(f"w{i}"), *common, "--name", f"w{i}", *worker_args, env=env, role="worker").start()
         for i in range(workers)],
    )
    RUNNING.append(started)
    for process in (*started.apis, *started.workers):
        process.wait_ready()
    return started


def workers(args, work: Path, redis: RedisServer, model_args: list[str]) -> dict:
    """At the demo model's own 64 px, and at 128 px where one image's work outweighs its HTTP and Redis costs."""
    out: dict = {}
    for size in args.sizes:
        body = {"prompt": "a red circle on blue", "steps": args.steps, "width": size, "height": size}
        at: dict = {}
        for count in (1, 2):
            running = cluster(work, redis, 1, count, *model_args, "--device", "cpu", env=ONE_THREAD, db=count)
            run_clients(running.urls, body, 4, 8)  # warm-up
            runs = [run_clients(running.urls, body, args.clients, args.requests) for _ in range(args.repeats)]
            best = statistics.median(r["images_per_s"] for r in runs)
            at[str(count)] = {"runs": runs, "images_per_s": best}
            print(f"  {size} px, {count} worker(s): {best:.2f} images/s (median of {args.repeats})", flush=True)
            running.stop()
        at["ratio"] = at["2"]["images_per_s"] / at["1"]["images_per_s"]
        print(f"  {size} px: 2 workers / 1 worker = {at['ratio']:.2f}", flush=True)
        out[str(size)] = at
    return out


def controlplane(args, work: Path, redis: RedisServer) -> dict:
    flags = ("--max-queue", "100000")
    worker_flags = ("--max-batch", "64", "--batch-wait-ms", "0")
    noop = {"SDSERVE_ENGINE": "noop"}
    folder = work / "embedded"
    folder.mkdir(exist_ok=True)
    embedded = Server(folder, *flags, *worker_flags, env=noop).start()
    embedded.wait_ready()
    asyncio.run(_control_plane(embedded.url, 200, 32))
    local = [asyncio.run(_control_plane(embedded.url, args.jobs, 32)) for _ in range(args.repeats)]
    embedded.stop()
    running = cluster(work, redis, 2, 1, *worker_flags, api_args=flags, env=noop, db=3)
    counted = [p.url for p in (*running.apis, *running.workers)]  # each job's end is counted where recorded
    asyncio.run(_control_plane(running.urls, 200, 32, counted))
    shared = [asyncio.run(_control_plane(running.urls, args.jobs, 32, counted)) for _ in range(args.repeats)]
    running.stop()
    result = {"embedded": local, "redis_2_replicas": shared,
              "embedded_jobs_per_s": statistics.median(r["jobs_per_s"] for r in local),
              "redis_jobs_per_s": statistics.median(r["jobs_per_s"] for r in shared)}
    result["ratio"] = result["redis_jobs_per_s"] / result["embedded_jobs_per_s"]
    print(f"  control plane: embedded {result['embedded_jobs_per_s']:.0f} jobs/s, 2 replicas on Redis "
          f"{result['redis_jobs_per_s']:.0f} jobs/s, ratio {result['ratio']:.2f}", flush=True)
    return result


def recovery(args, work: Path, redis: RedisServer, model_args: list[str]) -> dict:
    lease = 5.0
    times = []
    for attempt in range(args.repeats):
        running = cluster(work, redis, 1, 2, *model_args, "--device", "cpu", "--lease-s", str(lease),
                          env=ONE_THREAD, db=4)
        api = running.urls[0]
        body = {"prompt": "x", "steps": 60, "width": args.size, "height": args.size}
        job_id = httpx.post(api + "/api/v1/jobs", json=body).json()["id"]
        while True:
            job = httpx.get(f"{api}/api/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["step"] >= 1:
                break
            time.sleep(0.02)
        holder = next(w for w in running.workers if w.cmd[w.cmd.index("--name") + 1] == job["worker"])
        killed = time.perf_counter()
        holder.proc.kill()
        holder.proc.wait()
        while httpx.get(f"{api}/api/v1/jobs/{job_id}").json()["status"] != "succeeded":
            time.sleep(0.02)
        times.append(time.perf_counter() - killed)
        running.stop()
    result = {"lease_s": lease, "runs_s": times, "median_s": statistics.median(times)}
    print(f"  recovery: median {result['median_s']:.2f} s from kill -9 to done elsewhere (lease {lease:.0f} s)",
          flush=True)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    if "workers" in results:
        w = results["workers"]
        labels, values, colors = [], [], []
        for size, at in w.items():
            for count in ("1", "2"):
                labels.append(f"{size} px\n{count} worker{'s' if count == '2' else ''}")
                values.append(at[count]["images_per_s"])
                colors.append("#999" if count == "1" else "#3a7")
        axes[0].bar(labels, values, color=colors)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("images / s (log)")
        axes[0].set_title("Workers: " + ", ".join(f"{size} px {at['ratio']:.2f}x" for size, at in w.items()))
    if "controlplane" in results:
        c = results["controlplane"]
        axes[1].bar(["embedded\n(SQLite)", "2 replicas\n(Redis)"], [c["embedded_jobs_per_s"], c["redis_jobs_per_s"]],
                    color=["#999", "#37a"])
        axes[1].set_ylabel("jobs / s (no-op engine)")
        axes[1].set_title(f"Control plane: {c['ratio']:.2f}x")
    if "recovery" in results:
        r = results["recovery"]
        axes[2].bar([f"run {i + 1}" for i in range(len(r["runs_s"]))], r["runs_s"], color="#a73")
        axes[2].axhline(r["lease_s"], color="k", linestyle="--", linewidth=1, label="lease")
        axes[2].set_ylabel("seconds, kill -9 to done")
        axes[2].set_title("Recovery")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"{results['machine']['label']}: sdserve on Redis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART", help="workers, controlplane, recovery (default: all)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sides for `workers`")
    parser.add_argument("--size", type=int, default=64, help="image side for `recovery`")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    parts = {"workers", "controlplane", "recovery"}
    args.parts = args.parts or sorted(parts)
    if not set(args.parts) <= parts:
        parser.error(f"unknown part(s): {', '.join(sorted(set(args.parts) - parts))}")

    from sdserve.engine.demo import DEMO_PATH

    work = Path(tempfile.mkdtemp(prefix="sdserve-scaleout-"))
    model_args = ["--model", str(DEMO_PATH)]
    redis = RedisServer(work / "redis").start()
    results: dict = {"machine": machine("cpu"), "command": " ".join(sys.argv)}
    print(f"sdserve scale-out bench on {results['machine']['label']} (work dir {work})", flush=True)
    try:
        if "workers" in args.parts:
            results["workers"] = workers(args, work, redis, model_args)
        if "controlplane" in args.parts:
            results["controlplane"] = controlplane(args, work, redis)
        if "recovery" in args.parts:
            results["recovery"] = recovery(args, work, redis, model_args)
    finally:
        for running in list(RUNNING):
            running.stop()
        redis.stop()
    name = "scaleout-" + results["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
