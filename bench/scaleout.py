"""Scale-out benchmarks on a real redis-server, side by side in one run. `make bench-scaleout` runs them.

  workers        images/s with 2 workers over 1 worker on one Redis queue: `sdserve serve` replicas
                 (each an API replica and a worker), each worker on one torch thread, the demo model at
                 64x64, 20 steps, 16 closed-loop HTTP clients spread round-robin over the replicas.
  controlplane   jobs/s with the no-op engine: 2 replicas on Redis against the embedded path (one
                 process, SQLite), the same load generator.
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
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from components import RedisServer  # noqa: E402  (the tests' real redis-server, started on a free port)
from run import RESULTS, Server, _control_plane, machine, run_clients  # noqa: E402

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def replicas(work: Path, redis: RedisServer, count: int, *args: str, env: dict | None = None,
             db: int = 0) -> list[Server]:
    import redis as redis_py

    url = redis.url.rsplit("/", 1)[0] + f"/{db}"
    redis_py.Redis.from_url(url).flushdb()
    servers = []
    for i in range(count):
        folder = work / f"replica-{db}-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        servers.append(Server(folder, "--queue", url, "--storage", f"file://{work / f'images-{db}'}",
                              "--name", f"w{i}", *args, env=env).start())
    for server in servers:
        server.wait_ready()
    return servers


def workers(args, work: Path, redis: RedisServer, model_args: list[str]) -> dict:
    body = {"prompt": "a red circle on blue", "steps": args.steps, "width": args.size, "height": args.size}
    out = {}
    for count, db in ((1, 1), (2, 2)):
        servers = replicas(work, redis, count, *model_args, "--device", "cpu", env=ONE_THREAD, db=db)
        urls = [s.url for s in servers]
        run_clients(urls, body, 4, 8)  # warm-up
        runs = [run_clients(urls, body, args.clients, args.requests) for _ in range(args.repeats)]
        best = statistics.median(r["images_per_s"] for r in runs)
        out[str(count)] = {"runs": runs, "images_per_s": best}
        print(f"  {count} worker(s): {best:.2f} images/s (median of {args.repeats})", flush=True)
        for server in servers:
            server.stop()
    out["ratio"] = out["2"]["images_per_s"] / out["1"]["images_per_s"]
    print(f"  2 workers / 1 worker = {out['ratio']:.2f}", flush=True)
    return out


def controlplane(args, work: Path, redis: RedisServer) -> dict:
    flags = ("--max-queue", "100000", "--max-batch", "64", "--batch-wait-ms", "0")
    noop = {"SDSERVE_ENGINE": "noop"}
    folder = work / "embedded"
    folder.mkdir(exist_ok=True)
    embedded = Server(folder, *flags, env=noop).start()
    embedded.wait_ready()
    asyncio.run(_control_plane(embedded.url, 200, 32))
    local = [asyncio.run(_control_plane(embedded.url, args.jobs, 32)) for _ in range(args.repeats)]
    embedded.stop()
    cluster = replicas(work, redis, 2, *flags, env=noop, db=3)
    urls = [s.url for s in cluster]
    asyncio.run(_control_plane(urls, 200, 32))
    shared = [asyncio.run(_control_plane(urls, args.jobs, 32)) for _ in range(args.repeats)]
    for server in cluster:
        server.stop()
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
        servers = replicas(work, redis, 2, *model_args, "--device", "cpu", "--lease-s", str(lease),
                           env=ONE_THREAD, db=4)
        body = {"prompt": "x", "steps": 60, "width": args.size, "height": args.size}
        job_id = httpx.post(servers[0].url + "/api/v1/jobs", json=body).json()["id"]
        while True:
            job = httpx.get(f"{servers[0].url}/api/v1/jobs/{job_id}").json()
            if job["status"] == "running" and job["step"] >= 1:
                break
            time.sleep(0.02)
        holder = next(s for s in servers if s.cmd[s.cmd.index("--name") + 1] == job["worker"])
        other = next(s for s in servers if s is not holder)
        killed = time.perf_counter()
        holder.proc.kill()
        holder.proc.wait()
        while httpx.get(f"{other.url}/api/v1/jobs/{job_id}").json()["status"] != "succeeded":
            time.sleep(0.02)
        times.append(time.perf_counter() - killed)
        other.stop()
        holder.log.close()
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
        axes[0].bar(["1 worker", "2 workers"], [w["1"]["images_per_s"], w["2"]["images_per_s"]], color=["#999", "#3a7"])
        axes[0].set_ylabel("images / s")
        axes[0].set_title(f"Workers on one Redis: {w['ratio']:.2f}x")
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
    parser.add_argument("--size", type=int, default=64)
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

    from sdserve.engine.demo import ensure_demo

    work = Path(tempfile.mkdtemp(prefix="sdserve-scaleout-"))
    model_args = ["--model", str(ensure_demo(work))]
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
        redis.stop()
    name = "scaleout-" + results["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


if __name__ == "__main__":
    main()
