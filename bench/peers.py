"""sdserve beside what users would pick instead, in one run: `make bench BENCH_ARGS=peers`.

  fastapi-1t, fastapi-2t  the bare loop: FastAPI, one global pipeline behind a lock, 1 or 2 torch threads
  litserve                LitServe 0.2.19, max_batch_size=16, batch_timeout=0.02 (else its defaults), 2 threads
  ray                     Ray Serve 2.60, @serve.batch(16, 0.02) (else its defaults), 2 threads; inside a network
                          namespace with only loopback (`unshare --net`, root), as Ray listens on every interface
  sdserve                 `sdserve serve` with its defaults (one engine process on a CPU, on every core)
  sdserve-w2              `sdserve serve --workers 2`: two engine processes, each on half the cores

Every system runs the same pipeline object type, loaded by sdserve's registry (the demo model unless --model),
the same 64x64, 20-step DPM++ 2M requests and the same seeds; only the serving layer differs. Closed-loop HTTP
clients at 1, 4 and 16; passes alternate between the systems, and the figures are medians of the passes. The
peers' packages live in .venv/peers/<name> (pip --target, installed on first use), put ahead of the venv's on
PYTHONPATH, so their own FastAPI/uvicorn versions are used.

Writes bench/results/peers-<machine>.json and .png.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS_DIR = ROOT / ".venv" / "peers"
PACKAGES = {"litserve": "litserve==0.2.19", "ray": "ray[serve]==2.60.0"}
SYSTEMS = ("fastapi-1t", "fastapi-2t", "litserve", "ray", "sdserve", "sdserve-w2")
# sdserve's configurations by name: its defaults, and the flags of the others (bench/accel.py runs the speed-ups)
SDSERVE = {"sdserve": [], "sdserve-w2": ["--workers", "2"], "sdserve-none": ["--optimize", "none"],
           "sdserve-compile": ["--optimize", "compile"], "sdserve-freezing": ["--optimize", "compile,freezing"]}
CEILING = "ceiling"  # measured as a pass of its own, between the systems' passes: the machine drifts

sys.path.insert(0, str(HERE))
from run import RESULTS, free_port, machine, pct  # noqa: E402


def ensure_installed(name: str) -> Path:
    target = PEERS_DIR / name
    if not (target / ".installed").exists():
        print(f"  installing {PACKAGES[name]} into {target}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), PACKAGES[name]],
                       check=True)
        (target / ".installed").touch()
    return target


# ---------------------------------------------------------------- one system, one pass (may run in a netns)
def _launch(system: str, model: str, port: int, work: Path) -> tuple[subprocess.Popen, str, str]:
    """Start the server; (process, URL of the generate route, readiness path)."""
    env = {**os.environ, "PEER_MODEL": model, "PEER_PORT": str(port), "PEER_DATA": str(work),
           "TRANSFORMERS_VERBOSITY": "error"}
    log = (work / f"{system}-{port}.log").open("ab")
    base = f"http://127.0.0.1:{port}"
    if system.startswith("sdserve"):
        cmd = [sys.executable, "-m", "sdserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(work / f"sdserve-{port}"), "--model", model, *SDSERVE[system]]
        # its own session, as the peers: the engine processes it starts are stopped with it
        return (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True),
                base + "/api/v1/generate", "/readyz")
    script = {"fastapi-1t": "fastapi_loop.py", "fastapi-2t": "fastapi_loop.py", "litserve": "litserve_app.py",
              "ray": "ray_app.py"}[system]
    env["PEER_THREADS"] = "1" if system == "fastapi-1t" else "2"
    paths = [str(PEERS_DIR / system)] if system in PACKAGES else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(HERE / "peers"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, str(HERE / "peers" / script)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    route = {"litserve": "/predict"}.get(system, "/generate")
    probe = {"fastapi-1t": "/health", "fastapi-2t": "/health", "litserve": "/health", "ray": "/-/healthz"}[system]
    return proc, base + route, probe


def _body(system: str, seed: int, size: int, steps: int) -> dict:
    if system.startswith("sdserve"):
        return {"prompt": "a red circle", "seed": seed, "steps": steps, "width": size, "height": size,
                "sampler": "DPM++ 2M"}
    return {"prompt": "a red circle", "seed": seed, "steps": steps, "size": size}


def _png(response: httpx.Response) -> bytes:
    if response.headers.get("content-type", "").startswith("image/png"):
        return response.content
    return base64.b64decode(response.json()["image"])


def _pixels_hash(png: bytes) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]


def _level(url: str, system: str, clients: int, total: int, size: int, steps: int, first_seed: int) -> dict:
    latencies: list[float] = []
    hashes: dict[int, str] = {}
    lock = threading.Lock()
    next_seed = [first_seed]
    last = first_seed + total

    def client() -> None:
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    seed = next_seed[0]
                    if seed >= last:
                        return
                    next_seed[0] += 1
                started = time.perf_counter()
                r = c.post(url, json=_body(system, seed, size, steps))
                r.raise_for_status()
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if seed < first_seed + 4:
                        hashes[seed - first_seed] = _pixels_hash(_png(r))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": total, "images_per_s": total / wall, "p50_s": statistics.median(latencies),
            "p95_s": pct(latencies, 0.95), "pixels": hashes}


def _wait_ready(proc: subprocess.Popen, port: int, probe: str, work: Path, system: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{system} exited: {(work / f'{system}-{port}.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{probe}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{system} not ready in 300 s")
        time.sleep(0.2)


def measure(system: str, model: str, levels: list[int], requests: int, size: int, steps: int) -> dict:
    """Start `system`, warm it, run each level, stop it: the JSON of one pass."""
    work = Path(tempfile.mkdtemp(prefix=f"peer-{system}-"))
    port = free_port()
    started = time.perf_counter()
    proc, url, probe = _launch(system, model, port, work)
    try:
        _wait_ready(proc, port, probe, work, system)
        ready_s = time.perf_counter() - started
        first = _level(url, system, 1, 1, size, steps, 20_000)["p50_s"]  # start-up to the first image: this too
        # warm-up: first calls, and each batch shape the levels will meet (a compiler's first call of a shape)
        for c in sorted({4, *levels}):
            _level(url, system, c, 2 * c, size, steps, 10_000)
        return {"system": system, "ready_s": ready_s, "first_image_s": ready_s + first,
                "levels": [_level(url, system, c, max(requests, 4 * c), size, steps, 0) for c in levels]}
    finally:
        stop(proc)
        if system == "ray":
            subprocess.run([str(PEERS_DIR / "ray" / "bin" / "ray"), "stop", "--force"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(PEERS_DIR / "ray")})
        shutil.rmtree(work, ignore_errors=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (its workers, engine processes, Ray's raylets), then SIGKILL to
    what is left of it, so that no process of one pass competes with the next."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- the comparison
def _pass(system: str, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", system, "--model", args.model, "--levels",
           args.levels, "--requests", str(args.requests), "--size", str(args.size), "--steps", str(args.steps)]
    if system == "ray":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            print("  ray: left out: it listens on every interface, and a loopback-only network namespace "
                  "(unshare --net) needs root", flush=True)
            return None
        cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{system} pass failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peers(args) -> dict:
    for name in PACKAGES:
        ensure_installed(name)
    systems = [s for s in SYSTEMS if s in args.systems.split(",")] + [CEILING]
    passes: dict[str, list[dict]] = {s: [] for s in systems}
    for number in range(args.passes):
        for system in systems if number % 2 == 0 else reversed(systems):  # alternate the order: drift cancels
            result = _pass(system, args)
            if result is None:
                passes.pop(system, None)
                continue
            if system in passes:
                passes[system].append(result)
                print(f"  pass {number + 1}: {system}: " + ", ".join(
                    f"{lv['clients']} -> {lv['images_per_s']:.2f} img/s" for lv in result["levels"]), flush=True)
        systems = [s for s in systems if s in passes]
    levels = [int(c) for c in args.levels.split(",")]
    table = {s: {str(c): statistics.median(p["levels"][i]["images_per_s"] for p in runs)
                 for i, c in enumerate(levels)} for s, runs in passes.items()}
    ceiling = table.pop(CEILING)
    ceiling_passes = passes.pop(CEILING)
    p50 = {s: {str(c): statistics.median(p["levels"][i]["p50_s"] for p in runs) for i, c in enumerate(levels)}
           for s, runs in passes.items()}
    batching = [s for s in ("litserve", "ray") if s in table]
    peers_only = [s for s in table if not s.startswith("sdserve")]

    def ratios_of(ours: str) -> dict:
        ratios = {}
        for c in map(str, levels):
            ratios[c] = {f"vs_{s}": table[ours][c] / table[s][c] for s in peers_only}
            bare = [s for s in ("fastapi-1t", "fastapi-2t") if s in table]
            if bare:
                ratios[c]["vs_best_bare_loop"] = table[ours][c] / max(table[s][c] for s in bare)
            ratios[c]["of_compute_ceiling"] = table[ours][c] / ceiling[c]
            if batching:
                best = max(batching, key=lambda s: table[s][c])
                ratios[c]["vs_best_batching_server"] = table[ours][c] / table[best][c]
                ratios[c]["best_batching_server"] = best
        return ratios

    ratios = ratios_of("sdserve")
    more = {f"ratios_{s}": ratios_of(s) for s in table if s.startswith("sdserve-")}
    first = {s: runs[0]["levels"][0]["pixels"] for s, runs in passes.items()}
    return {"settings": {"model": args.model, "size": args.size, "steps": args.steps, "sampler": "DPM++ 2M",
                         "levels": levels, "passes": args.passes},
            "images_per_s": table, "compute_ceiling_images_per_s": ceiling, "p50_s": p50, "ratios": ratios, **more,
            "passes": passes, "ceiling_passes": ceiling_passes,
            # each system's first images against each sdserve's: equal bytes at the same thread count
            **{f"same_pixels_as_{ours}": {s: first[s] == first[ours] for s in first if s != ours}
               for ours in first if ours.startswith("sdserve")}}


def compute_ceiling(model: str, levels: list[int], size: int, steps: int) -> dict[str, float]:
    """What k closed-loop clients can get at most with this computation: one pipeline call over a batch of k
    images, no server at all, on the faster of 1 and 2 threads (median of 3)."""
    import torch

    sys.path.insert(0, str(HERE / "peers"))
    from common import generate, load

    pipe = load(model, 2)
    best: dict[str, float] = {}
    for c in levels:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            generate(pipe, ["a red circle"] * c, list(range(c)), steps, size)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                generate(pipe, ["a red circle"] * c, list(range(c)), steps, size)
                times.append(time.perf_counter() - started)
            best[str(c)] = max(best.get(str(c), 0.0), c / statistics.median(times))
    print("  compute ceiling (one pipeline call per batch of k, no server): " + ", ".join(
        f"{c} -> {v:.2f} img/s" for c, v in best.items()), flush=True)
    return best


# Where a runner-thread sample is, first match wins (py-spy frames: "function (file:line)").
PROFILE_RULES = (
    ("PNG encode", ("encode_png", "PngImagePlugin")),
    ("image store", ("storage/local.py", "storage/s3.py")),
    ("VAE decode", ("autoencoder_kl.py",)),
    ("UNet (denoise)", ("unet_2d_condition.py",)),
    ("text encoder", ("prompts.py", "modeling_clip")),
    ("scheduler step", ("scheduling_",)),
    ("progress and cancel checks", ("on_step", "progress (sdserve")),
    ("waiting for a job (queue, linger)", ("claim (sdserve",)),
    ("recording the job's end", ("_record (sdserve", "_finish (sdserve", "succeed (sdserve")),
    ("rest of the pipeline call", ("pipeline_stable_diffusion",)),
)


def profile(args, clients: int = 1, seconds: float = 15) -> dict:
    """`clients` closed-loop clients against `sdserve serve`. First unsampled, for the times: each job's queue
    wait (submitted in the API process, claimed in the engine's), run, and the rest of the client's latency (HTTP,
    and the hand-over of the result from the engine process to the API's); of that rest, the part after the end was
    recorded (`end_to_client`). Then sampled by py-spy from outside (200 Hz, idle included, the engine processes
    too), for the runner thread's time by phase."""
    from datetime import datetime

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="peer-profile-"))
    port = free_port()
    proc, url, probe = _launch("sdserve", args.model, port, work)
    raw = work / "profile.txt"
    samples: list[tuple[float, float, str]] = []  # (sent, answered) as unix times, job id
    try:
        _wait_ready(proc, port, probe, work, "sdserve")
        _level(url, "sdserve", clients, 4 * clients, args.size, args.steps, 10_000)  # warm-up: batch shapes
        stop_clients = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(timeout=120) as c:
                n = 0
                while not stop_clients.is_set():
                    sent = time.time()
                    r = c.post(url, json=_body("sdserve", 1000 * k + n, args.size, args.steps))
                    samples.append((sent, time.time(), r.headers["X-Job-Id"]))
                    n += 1

        def load(sample: bool) -> None:
            loops = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
            for loop in loops:
                loop.start()
            if sample:  # busy before the sampling starts and after it ends: no idle edges
                time.sleep(1)
                subprocess.run([spy, "record", "--pid", str(proc.pid), "--subprocesses", "--rate", "200",
                                "--duration", str(int(seconds)), "--idle", "--threads", "--format", "raw", "-o",
                                str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            else:
                time.sleep(seconds)
            stop_clients.set()
            for loop in loops:
                loop.join()
            stop_clients.clear()

        load(sample=False)
        timed = list(samples)
        load(sample=True)
        with httpx.Client(timeout=120) as c:
            records = {j: c.get(f"http://127.0.0.1:{port}/api/v1/jobs/{j}").json() for _, _, j in timed}
    finally:
        stop(proc)

    def at(job: dict, field: str) -> float:
        return datetime.fromisoformat(job[field]).timestamp()

    phases: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "sdserve-runner" not in stack:  # the runner thread (of each engine process)
            continue
        phase = next((name for name, marks in PROFILE_RULES if any(m in stack for m in marks)), "other")
        phases[phase] = phases.get(phase, 0) + int(count)
    total = sum(phases.values()) or 1
    ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    jobs = [(sent, answered, records[j]) for sent, answered, j in timed]
    result = {
        "clients": clients, "requests": len(jobs), "latency_p50_ms": ms([a - s for s, a, _ in jobs]),
        "queue_wait_p50_ms": ms([at(j, "started_at") - at(j, "created_at") for _, _, j in jobs]),
        "run_p50_ms": ms([at(j, "finished_at") - at(j, "started_at") for _, _, j in jobs]),
        "end_to_client_p50_ms": ms([a - at(j, "finished_at") for _, a, j in jobs]),
        "runner_thread_share": {k: v / total for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        "note": "times unsampled; shares sampled by py-spy (which slows the process: shares matter there)",
    }
    result["http_and_handover_p50_ms"] = result["latency_p50_ms"] - result["queue_wait_p50_ms"] - result["run_p50_ms"]
    print(f"  profile, {clients} client(s): latency p50 {result['latency_p50_ms']:.0f} ms = queue wait "
          f"{result['queue_wait_p50_ms']:.1f} + run {result['run_p50_ms']:.0f} + HTTP and hand-over "
          f"{result['http_and_handover_p50_ms']:.1f} (from the recorded end to the client "
          f"{result['end_to_client_p50_ms']:.1f}); runner thread: " + ", ".join(
              f"{k} {v:.1%}" for k, v in result["runner_thread_share"].items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = results["peers"]
    levels = r["settings"]["levels"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(r["images_per_s"])
    for i, (system, row) in enumerate(r["images_per_s"].items()):
        ax.bar([k + i * width for k in range(len(levels))], [row[str(c)] for c in levels], width, label=system)
    ceiling = r.get("compute_ceiling_images_per_s")
    if ceiling:
        for k, c in enumerate(levels):
            ax.hlines(ceiling[str(c)], k - width / 2, k + 0.8 - width / 2, colors="k", linestyles="dashed",
                      label="compute ceiling" if k == 0 else None)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(levels))], [f"{c} client(s)" for c in levels])
    ax.set_ylabel("images/s (median of passes)")
    s = r["settings"]
    ax.set_title(f"{results['machine']['label']}: {s['size']}x{s['size']}, {s['steps']} steps, {s['sampler']}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=(*SYSTEMS, *SDSERVE, CEILING), help="(internal) run one pass of one system, print "
                        "its JSON")
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests", type=int, default=24, help="requests per level, at least (4 per client)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of one client")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    if args.model is None:
        from sdserve.engine.demo import DEMO_PATH

        args.model = str(DEMO_PATH)
    if args.one == CEILING:
        levels = [int(c) for c in args.levels.split(",")]
        best = compute_ceiling(args.model, levels, args.size, args.steps)
        result = {"system": CEILING, "levels": [{"clients": c, "images_per_s": best[str(c)], "p50_s": 0.0,
                                                 "pixels": {}} for c in levels]}
        print(json.dumps(result))
        return
    if args.one:
        result = measure(args.one, args.model, [int(c) for c in args.levels.split(",")], args.requests, args.size,
                         args.steps)
        print(json.dumps(result))
        return
    results = {"machine": machine("cpu"), "command": " ".join(sys.argv)}
    print(f"sdserve beside its peers on {results['machine']['label']}", flush=True)
    results["peers"] = peers(args)
    if not args.no_profile:
        results["profiles"] = {str(c): profile(args, c) for c in (1, 16)}
    name = args.name or "peers-" + results["machine"]["label"].lower().replace(" ", "-").replace(",", "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(results, RESULTS / f"{name}.png")
    print_table(results)
    print(f"wrote {RESULTS / name}.json and .png")


def print_table(results: dict) -> None:
    r = results["peers"]
    levels = r["settings"]["levels"]
    print("\n| system | " + " | ".join(f"{c} client(s) img/s" for c in levels) + " |")
    print("|---|" + "---|" * len(levels))
    for system, row in r["images_per_s"].items():
        print(f"| {system} | " + " | ".join(f"{row[str(c)]:.2f}" for c in levels) + " |")
    ceiling = r["compute_ceiling_images_per_s"]
    print("| compute ceiling (no server) | " + " | ".join(f"{ceiling[str(c)]:.2f}" for c in levels) + " |")
    for key in [k for k in r if k.startswith("ratios")]:
        for c, ratio in r[key].items():
            print(f"{key}, {c} client(s): " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in ratio.items()))


if __name__ == "__main__":
    main()
