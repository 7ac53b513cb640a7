"""sdserve benchmarks, every system side by side in one run. `make bench` runs them all.

  throughput     (a) the diffusers pipeline called directly in a loop (the floor), (b) sdserve with
                 --max-batch 1 (serial, like A1111's lock), (c) sdserve with dynamic batching; HTTP
                 clients at 1, 4 and 16 at once. Images/s, p50/p95 latency, c/b and b/a.
  overhead       at one client, latency of (b) over (a).
  coldstart      seconds from launching `sdserve serve` to the first image.
  controlplane   jobs/s through queue, store and HTTP with a no-op engine.
  accel          --optimize none / auto / compile beside the peers, start-up and the quality gate (bench/accel.py;
                 run on its own: `make bench BENCH_ARGS=accel`).
  peers          sdserve beside a bare FastAPI loop, LitServe and Ray Serve (bench/peers.py; run on its own:
                 `make bench BENCH_ARGS=peers`).
  previews       what a step preview costs against a step at batch 16 (bench/previews.py; run on its own:
                 `make bench BENCH_ARGS=previews`).
  mixedcfg       (c) at 16 clients, every client at CFG 7 vs each client at its own CFG (2..12): guidance is per
                 image, so mixed CFG still batches; mixed/same should be ~1.

Writes bench/results/<machine>.json and .png, and prints a table. Same model and settings
everywhere: the demo model (or --model), 64x64 (or --size), 20 steps, the default sampler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Server:
    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None, role: str = "serve") -> None:
        """`sdserve serve`, `api` or `worker` (whose url is its probe port: /readyz, /metrics)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        port_flag = "--metrics-port" if role == "worker" else "--port"
        self.cmd = [sys.executable, "-m", "sdserve.cli", role, "--host", "127.0.0.1", port_flag, str(self.port),
                    "--data-dir", str(data_dir), *args]
        self.env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", **(env or {})}
        self.log = open(data_dir / f"{role}-{self.port}.log", "ab")

    def start(self) -> "Server":
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_clients(url: str | list[str], body: dict | list[dict], clients: int, total: int) -> dict:
    """`clients` closed-loop clients (each sends its next request when the last returns); with several URLs
    (replicas) client i talks to URL i mod n, as a round-robin balancer would spread them. With a list of
    bodies, client i sends body i mod n."""
    urls = [url] if isinstance(url, str) else url
    bodies = [body] if isinstance(body, dict) else body
    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [total]

    def client(url: str, body: dict) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                r = c.post("/api/v1/generate", json=body)
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(urls[i % len(urls)], bodies[i % len(bodies)]))
               for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": total, "images_per_s": total / wall, "wall_s": wall,
            "p50_s": statistics.median(latencies), "p95_s": pct(latencies, 0.95)}


def floor(model_path: Path, size: int, steps: int, total: int, device: str, threads: int | None = None) -> dict:
    """(a): diffusers alone, the same pipeline and sampler, one image at a time (torch's default
    threads, or `threads` to match what sdserve's engine picks on CPU)."""
    import torch

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    from sdserve.engine import samplers
    from sdserve.engine.models import ModelRegistry
    from sdserve.schema import DEFAULT_SAMPLER

    registry = ModelRegistry(model_path.parent, model_path.parent.parent, extra=[str(model_path)], device=device)
    pipe = registry.load(str(model_path)).pipelines["txt2img"]  # plain diffusers pipeline, loaded as diffusers does
    pipe.scheduler = samplers.make_scheduler(samplers.resolve(DEFAULT_SAMPLER), dict(pipe.scheduler.config))
    gen_device = registry.device

    def one(seed: int) -> float:
        started = time.perf_counter()
        pipe("a red circle", num_inference_steps=steps, width=size, height=size,
             generator=torch.Generator(gen_device).manual_seed(seed))
        return time.perf_counter() - started

    for seed in range(3):
        one(seed)
    latencies = [one(seed) for seed in range(total)]
    torch.set_num_threads(default_threads)
    return {"clients": 1, "requests": total, "images_per_s": total / sum(latencies), "threads": threads or default_threads,
            "p50_s": statistics.median(latencies), "p95_s": pct(latencies, 0.95)}


def throughput(args, data_dir: Path, model_args: list[str], model_path: Path) -> dict:
    body = {"prompt": "a red circle", "steps": args.steps, "width": args.size, "height": args.size}
    levels = [int(c) for c in args.clients.split(",")]
    result: dict = {"settings": body, "levels": levels, "a": floor(model_path, args.size, args.steps, args.requests, args.device)}
    print(f"  (a) diffusers loop: {result['a']['images_per_s']:.2f} img/s, p50 {result['a']['p50_s']:.3f} s", flush=True)
    if result["a"]["threads"] > 1 and args.device in ("auto", "cpu"):
        # The floor on one thread too: on small models one thread can beat two (sdserve runs on the process's
        # threads; OMP_NUM_THREADS=1 gives it one).
        result["a_same_threads"] = floor(model_path, args.size, args.steps, args.requests, args.device, threads=1)
        print(f"  (a') diffusers loop, 1 thread: {result['a_same_threads']['images_per_s']:.2f} img/s, "
              f"p50 {result['a_same_threads']['p50_s']:.3f} s", flush=True)
    for name, extra in (("b", ["--max-batch", "1"]), ("c", args.batch_args.split())):
        server = Server(data_dir, *model_args, "--device", args.device, "--max-queue", "4096", *extra).start()
        server.wait_ready()
        run_clients(server.url, body, 2, 6)  # warm-up
        result[name] = []
        for clients in levels:
            level = run_clients(server.url, body, clients, max(args.requests, clients * args.per_client))
            result[name].append(level)
            print(f"  ({name}) {clients:>2} clients: {level['images_per_s']:.2f} img/s, p50 {level['p50_s']:.3f} s, "
                  f"p95 {level['p95_s']:.3f} s", flush=True)
        server.stop()
    result["c_over_b"] = {str(b["clients"]): c["images_per_s"] / b["images_per_s"] for b, c in zip(result["b"], result["c"])}
    result["b_over_a_latency_1_client"] = result["b"][0]["p50_s"] / result["a"]["p50_s"]
    if "a_same_threads" in result:
        result["b_over_a_same_threads_latency_1_client"] = result["b"][0]["p50_s"] / result["a_same_threads"]["p50_s"]
    result["b_over_a_images_per_s"] = {str(b["clients"]): b["images_per_s"] / result["a"]["images_per_s"]
                                       for b in result["b"]}
    return result


def coldstart(args, data_dir: Path, model_args: list[str], runs: int = 3) -> dict:
    times = []
    for _ in range(runs):
        server = Server(data_dir, *model_args, "--device", args.device).start()
        while True:
            try:
                r = httpx.get(server.url + "/", params={"prompt": "first", "steps": args.steps,
                                                         "width": args.size, "height": args.size}, timeout=600)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        times.append(time.perf_counter() - server.started)
        server.stop()
    print(f"  cold start: median {statistics.median(times):.2f} s over {runs} launches", flush=True)
    return {"runs_s": times, "median_s": statistics.median(times)}


async def _post_loop(host: str, port: int, bodies, ids: list[str]) -> None:
    """One keep-alive HTTP/1.1 connection posting jobs back to back. A raw client: an httpx request
    costs ~3 ms of CPU, more than the server spends on a job, and both share this machine."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for body in bodies:
            writer.write(b"POST /api/v1/jobs HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            payload = await reader.readexactly(length)
            if b" 202 " not in status:
                raise RuntimeError(f"{status!r} {payload[:200]!r}")
            ids.append(json.loads(payload)["id"])
    finally:
        writer.close()


async def _control_plane(url: str | list[str], total: int, concurrency: int, counted: list[str] | None = None) -> dict:
    """Jobs posted over `concurrency` connections (spread over the URLs: replicas), until all have ended,
    counted from sdserve_jobs_total of the processes that end jobs (`counted`: default, the URLs)."""
    urls = [url] if isinstance(url, str) else url
    bodies = [json.dumps({"prompt": f"p{i}", "steps": 1}).encode() for i in range(total)]
    ids: list[str] = []

    async def finished() -> float:
        count = 0.0
        async with httpx.AsyncClient(timeout=60) as c:
            for u in counted or urls:
                text = (await c.get(u + "/metrics")).text
                count += sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("sdserve_jobs_total{"))
        return count

    baseline = await finished()
    started = time.perf_counter()
    targets = [u.split("//")[1].split(":") for u in urls]
    await asyncio.gather(*(_post_loop(targets[k % len(urls)][0], int(targets[k % len(urls)][1]),
                                      bodies[k::concurrency], ids) for k in range(concurrency)))
    submitted = time.perf_counter() - started
    while await finished() - baseline < total:
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - started
    return {"jobs": total, "concurrency": concurrency, "jobs_per_s": total / wall, "submit_per_s": total / submitted,
            "wall_s": wall}


def controlplane(args, data_dir: Path) -> dict:
    server = Server(data_dir, "--max-queue", "100000", "--max-batch", "64", "--batch-wait-ms", "0",
                    env={"SDSERVE_ENGINE": "noop"}).start()
    server.wait_ready()
    asyncio.run(_control_plane(server.url, 200, 32))  # warm-up
    result = asyncio.run(_control_plane(server.url, args.jobs, 32))
    server.stop()
    print(f"  control plane: {result['jobs_per_s']:.0f} jobs/s end to end ({result['submit_per_s']:.0f}/s accepted)",
          flush=True)
    return result


def mixedcfg(args, data_dir: Path, model_args: list[str], clients: int = 16, passes: int = 3) -> dict:
    """Dynamic batching at `clients` clients, all at one CFG scale vs each client at its own, alternated over
    `passes` passes; medians and their ratio."""
    body = {"prompt": "a red circle", "steps": args.steps, "width": args.size, "height": args.size}
    mixed = [{**body, "cfg_scale": 2.0 + 10.0 * i / (clients - 1)} for i in range(clients)]
    server = Server(data_dir, *model_args, "--device", args.device, "--max-queue", "4096",
                    *args.batch_args.split()).start()
    server.wait_ready()
    run_clients(server.url, body, 2, 6)  # warm-up
    runs: dict[str, list[dict]] = {"same": [], "mixed": []}
    total = max(args.requests, clients * args.per_client)
    for _ in range(passes):
        runs["same"].append(run_clients(server.url, {**body, "cfg_scale": 7.0}, clients, total))
        runs["mixed"].append(run_clients(server.url, mixed, clients, total))
    server.stop()
    result = {name: {"images_per_s": statistics.median(r["images_per_s"] for r in levels),
                     "p50_s": statistics.median(r["p50_s"] for r in levels), "passes": levels}
              for name, levels in runs.items()}
    result["clients"] = clients
    result["mixed_over_same"] = result["mixed"]["images_per_s"] / result["same"]["images_per_s"]
    print(f"  mixed CFG, {clients} clients: {result['mixed']['images_per_s']:.2f} img/s vs one CFG "
          f"{result['same']['images_per_s']:.2f} img/s: {result['mixed_over_same']:.2f}x", flush=True)
    return result


def plot_mixedcfg(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["mixedcfg"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for x, name in enumerate(("same", "mixed")):
        ax.scatter([x] * len(m[name]["passes"]), [p["images_per_s"] for p in m[name]["passes"]], color="grey", s=12)
        ax.bar(x, m[name]["images_per_s"], 0.6, alpha=0.7)
    ax.set_xticks([0, 1], ["one CFG (7)", "each client its own CFG"])
    ax.set_ylabel("images / s (median; dots: passes)")
    ax.set_title(f"{m['clients']} clients, {results['machine']['label']}: {m['mixed_over_same']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["throughput"]
    levels = t["levels"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = range(len(levels))
    width = 0.38
    left.bar([x - width / 2 for x in xs], [r["images_per_s"] for r in t["b"]], width, label="(b) sdserve --max-batch 1")
    left.bar([x + width / 2 for x in xs], [r["images_per_s"] for r in t["c"]], width, label="(c) sdserve, dynamic batching")
    left.axhline(t["a"]["images_per_s"], color="k", linestyle="--", linewidth=1, label="(a) diffusers loop (floor)")
    if "a_same_threads" in t:
        left.axhline(t["a_same_threads"]["images_per_s"], color="grey", linestyle=":", linewidth=1,
                     label="(a') diffusers loop, engine's thread count")
    for x, (b, c) in enumerate(zip(t["b"], t["c"])):
        left.text(x + width / 2, c["images_per_s"], f"{c['images_per_s'] / b['images_per_s']:.2f}x", ha="center",
                  va="bottom", fontsize=9)
    left.set_xticks(list(xs), [f"{c} client{'s' if c > 1 else ''}" for c in levels])
    left.set_ylabel("images / s")
    left.set_title("Throughput")
    left.legend(fontsize=8)
    for name, style in (("b", "o-"), ("c", "s-")):
        right.plot(levels, [r["p50_s"] for r in t[name]], style, label=f"({name}) p50")
        right.plot(levels, [r["p95_s"] for r in t[name]], style, alpha=0.4, label=f"({name}) p95")
    right.axhline(t["a"]["p50_s"], color="k", linestyle="--", linewidth=1, label="(a) p50")
    right.set_xscale("log", base=2)
    right.set_xticks(levels, [str(c) for c in levels])
    right.set_xlabel("concurrent clients")
    right.set_ylabel("latency per request (s)")
    right.set_title("Latency")
    right.legend(fontsize=8)
    s = t["settings"]
    fig.suptitle(f"{results['machine']['label']}: {results['model']}, {s['width']}x{s['height']}, {s['steps']} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine(device: str) -> dict:
    import torch

    label = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        label = torch.cuda.get_device_name(0)
    return {"label": label, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    if sys.argv[1:2] == ["peers"]:  # sdserve beside the bare loop, LitServe and Ray Serve: bench/peers.py
        import peers

        peers.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["accel"]:  # the engine paths (--optimize) beside each other and the peers: bench/accel.py
        import accel

        accel.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["seeds"]:  # how far a seed's image moves with its batch: bench/seeds.py
        import seeds

        seeds.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["previews"]:  # what a step preview costs: bench/previews.py
        import previews

        previews.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["bounds"]:  # what one request may cost: bench/bounds.py
        import bounds

        bounds.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help="throughput, coldstart, controlplane, mixedcfg (default: all)")
    parser.add_argument("--model", default="demo", help="demo, a diffusers folder or a .safetensors file")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=24, help="requests per level, at least")
    parser.add_argument("--per-client", type=int, default=4, help="requests per client at each level, at least")
    parser.add_argument("--batch-args", default="", help="flags for (c), e.g. '--max-batch 8'; default: the server's")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs for the control-plane run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default=None, help="results file name; default from the machine")
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the plot and table of a results file, run nothing")
    args = parser.parse_args()
    if args.plot_only:
        path = Path(args.plot_only)
        results = json.loads(path.read_text())
        (plot if "throughput" in results else plot_mixedcfg)(results, path.with_suffix(".png"))
        print_table(results)
        return
    parts = {"throughput", "coldstart", "controlplane", "mixedcfg"}
    args.parts = args.parts or sorted(parts)
    if not set(args.parts) <= parts:
        parser.error(f"unknown part(s): {', '.join(sorted(set(args.parts) - parts))}")

    from sdserve.engine.demo import DEMO_PATH

    work = Path(tempfile.mkdtemp(prefix="sdserve-bench-"))
    model_path = DEMO_PATH if args.model == "demo" else Path(args.model).resolve()
    model_args = ["--model", str(model_path)]
    results: dict = {"machine": machine(args.device), "model": args.model, "command": " ".join(sys.argv)}
    print(f"sdserve bench on {results['machine']['label']} (work dir {work})", flush=True)
    if "throughput" in args.parts:
        results["throughput"] = throughput(args, work, model_args, model_path)
    if "coldstart" in args.parts:
        results["coldstart"] = coldstart(args, work, model_args)
    if "controlplane" in args.parts:
        results["controlplane"] = controlplane(args, work)
    if "mixedcfg" in args.parts:
        results["mixedcfg"] = mixedcfg(args, work, model_args)

    name = args.name or results["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    if "throughput" in results:
        plot(results, RESULTS / f"{name}.png")
    elif "mixedcfg" in results:
        plot_mixedcfg(results, RESULTS / f"{name}.png")
    print_table(results)
    print(f"wrote {RESULTS / name}.json" + (" and .png" if {"throughput", "mixedcfg"} & set(results) else ""))


def print_table(results: dict) -> None:
    if "throughput" in results:
        t = results["throughput"]
        print("\n| clients | (a) diffusers img/s | (b) serial img/s | (c) batched img/s | c/b | b p50 s | c p50 s | c p95 s |")
        print("|---|---|---|---|---|---|---|---|")
        for b, c in zip(t["b"], t["c"]):
            print(f"| {b['clients']} | {t['a']['images_per_s']:.2f} | {b['images_per_s']:.2f} | {c['images_per_s']:.2f} | "
                  f"{c['images_per_s'] / b['images_per_s']:.2f} | {b['p50_s']:.3f} | {c['p50_s']:.3f} | {c['p95_s']:.3f} |")
        print(f"\noverhead, 1 client: b/a latency = {t['b_over_a_latency_1_client']:.3f}")
        if "b_over_a_same_threads_latency_1_client" in t:
            print(f"overhead, 1 client, floor on the engine's thread count: b/a' = "
                  f"{t['b_over_a_same_threads_latency_1_client']:.3f}")
    if "coldstart" in results:
        print(f"cold start: {results['coldstart']['median_s']:.2f} s (median)")
    if "controlplane" in results:
        print(f"control plane: {results['controlplane']['jobs_per_s']:.0f} jobs/s")
    if "mixedcfg" in results:
        m = results["mixedcfg"]
        print(f"mixed CFG at {m['clients']} clients: {m['mixed']['images_per_s']:.2f} img/s vs one CFG "
              f"{m['same']['images_per_s']:.2f} img/s ({m['mixed_over_same']:.2f}x)")


if __name__ == "__main__":
    main()
