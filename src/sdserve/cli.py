"""The `sdserve` command: serve | generate | models."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from sdserve import bounds
from sdserve.config import Settings

app = typer.Typer(help="sdserve: a self-hosted Stable Diffusion server.", no_args_is_help=True, add_completion=False)
console = Console(stderr=True)

ModelsDir = Annotated[Optional[Path], typer.Option("--models-dir", help="Folder scanned for models. [env: SDSERVE_MODELS_DIR]")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Jobs, images, the demo model. [env: SDSERVE_DATA_DIR]")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto|cpu|cuda|mps. [env: SDSERVE_DEVICE]")]
AllowPickle = Annotated[
    Optional[bool],
    typer.Option("--allow-pickle/--no-allow-pickle", help="Load .ckpt/.bin/.pt checkpoints (they can run code). [env: SDSERVE_ALLOW_PICKLE]"),
]
ModelOpt = Annotated[
    Optional[list[str]],
    typer.Option("--model", help="demo, a diffusers folder, a .safetensors file or a hub id; repeat for more, "
                 "the first is the default. [env: SDSERVE_MODELS, comma-separated]"),
]
MaxBatch = Annotated[
    Optional[int], typer.Option(help="Images per UNet pass (1 = serial). Default: 16 on CPU, 8 on GPU. "
                                "[env: SDSERVE_MAX_BATCH]"),
]
BatchWait = Annotated[
    Optional[float], typer.Option(help="How long a batch waits for companions. [env: SDSERVE_BATCH_WAIT_MS]"),
]
Optimize = Annotated[
    Optional[str],
    typer.Option(help="Speed-ups, comma-separated: auto (the default: openvino on a CPU, channels_last on CUDA), "
                 "none (plain torch), openvino, channels_last, compile, freezing, cuda_graphs. "
                 "[env: SDSERVE_OPTIMIZE; compiled graphs cache in SDSERVE_COMPILE_CACHE, default <data dir>/compiled]"),
]
QueueURL = Annotated[
    Optional[str],
    typer.Option(help="The job queue: sqlite:///path/jobs.db (default: DATA_DIR/jobs.db) or "
                 "redis://HOST:PORT/DB, shared by every process that names it. [env: SDSERVE_QUEUE]"),
]
LeaseS = Annotated[
    Optional[float], typer.Option(help="How long a silent worker keeps its jobs. [env: SDSERVE_LEASE_S]"),
]
WorkerName = Annotated[
    Optional[str], typer.Option(help="This worker's name in job records (default hostname-pid). "
                                "[env: SDSERVE_NAME]"),
]
StorageURL = Annotated[
    Optional[str],
    typer.Option(help="Where images live: file:///path (default: DATA_DIR/images) or "
                 "s3://BUCKET/PREFIX?endpoint_url=http://HOST:PORT&region=REGION. [env: SDSERVE_STORAGE]"),
]

ApiKey = Annotated[
    Optional[list[str]],
    typer.Option("--api-key", help="Require this key (repeatable). [env: SDSERVE_API_KEYS, comma-separated]"),
]
ApiAuth = Annotated[
    Optional[str],
    typer.Option("--api-auth", help="HTTP Basic users 'u1:p1,u2:p2', as A1111's flag. [env: SDSERVE_API_AUTH]"),
]
MaxWork = Annotated[Optional[float], typer.Option(
    "--max-work", help="Most work one request may ask for, in megapixel-steps (width x height x steps x images, hires "
    "pass included; default: what this device class finishes within the job timeout). [env: SDSERVE_MAX_WORK]")]
MaxQueue = Annotated[Optional[int], typer.Option(help="Queued jobs before 429. [env: SDSERVE_MAX_QUEUE]")]
RateLimitOpt = Annotated[Optional[str], typer.Option(
    "--rate-limit", help="Submissions per caller (API key, user, or address), e.g. 5/s or 300/min; over it, 429. "
    "[env: SDSERVE_RATE_LIMIT]")]
RateBurst = Annotated[Optional[float], typer.Option(
    "--rate-burst", help="Submissions a caller may make at once (default: one window's count). [env: SDSERVE_RATE_BURST]")]
OnDisconnect = Annotated[Optional[str], typer.Option(
    "--on-disconnect", help="When a synchronous client (A1111, OpenAI, SageMaker, GET /?prompt=, /api/v1/generate) "
    "disconnects: its queued jobs are canceled; running ones 'finish' (default) or 'cancel'. [env: SDSERVE_ON_DISCONNECT]")]
ImagesPerMinute = Annotated[Optional[float], typer.Option(
    "--images-per-minute", help="Images per caller per minute; n=8 counts 8. [env: SDSERVE_IMAGES_PER_MINUTE]")]

KeysFile = Annotated[Optional[Path], typer.Option(
    "--keys-file", help="TOML or YAML file of API keys with labels, limits, priorities and fair-share weights "
    "(README: Many users). [env: SDSERVE_KEYS_FILE]")]
Moderation = Annotated[Optional[str], typer.Option(
    "--moderation", help="Check every image before it is visible: none, safety-checker, or an HTTP hook URL "
    "that receives the PNG. [env: SDSERVE_MODERATION]")]
SafetyChecker = Annotated[Optional[Path], typer.Option(
    "--safety-checker", help="Folder with diffusers' StableDiffusionSafetyChecker weights and its feature_extractor "
    "(for --moderation safety-checker). [env: SDSERVE_SAFETY_CHECKER]")]
Blocklist = Annotated[Optional[Path], typer.Option(
    "--blocklist", help="Words or phrases a prompt may not contain, one per line (# comments). [env: SDSERVE_BLOCKLIST]")]
PublicURL = Annotated[Optional[str], typer.Option(
    "--public-url", help="Where clients reach this server, e.g. https://sd.example.org: absolute links start with it "
    "and never with the request's Host. [env: SDSERVE_PUBLIC_URL]")]
AllowedHosts = Annotated[Optional[list[str]], typer.Option(
    "--allowed-hosts", help="Host headers to answer (repeat; *.example.org, * for any); others get 400. Default: "
    "loopback and this machine's names, or any with --public-url. [env: SDSERVE_ALLOWED_HOSTS, comma-separated]")]
PreviewEvery = Annotated[Optional[int], typer.Option(
    "--preview-every", help="Send a job's watchers the forming picture every N steps (0, the default: only jobs "
    "that ask, by preview_every). [env: SDSERVE_PREVIEW_EVERY]")]
WebhookSecret = Annotated[Optional[str], typer.Option(
    "--webhook-secret", help="Signs webhook deliveries (Standard Webhooks: whsec_ and the base64 of 16+ random "
    "bytes) for keys without a secret of their own. [env: SDSERVE_WEBHOOK_SECRET]")]
WebhookAllowHosts = Annotated[Optional[list[str]], typer.Option(
    "--webhook-allow-hosts", help="Hosts a webhook may reach although they resolve to a private, loopback or "
    "link-local address (repeat, or host,host). [env: SDSERVE_WEBHOOK_ALLOW_HOSTS, comma-separated]")]
KeepJobsDays = Annotated[Optional[float], typer.Option(
    "--keep-jobs-days", help="Delete ended jobs older than this (default 30; 0: keep). [env: SDSERVE_KEEP_JOBS_DAYS]")]
KeepImagesDays = Annotated[Optional[float], typer.Option(
    "--keep-images-days", help="Delete images older than this (default 30; 0: keep). [env: SDSERVE_KEEP_IMAGES_DAYS]")]


def _settings(**overrides: object) -> Settings:
    """Environment first, then explicit flags on top (a flag left out keeps the environment's value)."""
    try:
        given = {k: v for k, v in overrides.items() if v is not None}
        return Settings(**given)
    except ValidationError as exc:
        _fail("; ".join(f"{_source(e['loc'], given)}: {e['msg']}" for e in exc.errors()))


# Settings fields whose flag is named otherwise (the flag is singular and repeatable).
_FLAGS = {"api_keys": "--api-key", "models": "--model"}


def _source(loc: tuple, given: dict) -> str:
    """Where a bad value came from: the flag when one was given, else its environment variable."""
    field = str(loc[0]) if loc else ""
    if field in given:
        return _FLAGS.get(field) or "--" + field.replace("_", "-")
    return "SDSERVE_" + field.upper()


def _registry(settings: Settings):
    from sdserve.engine.models import ModelRegistry

    return ModelRegistry(
        settings.models_dir,
        settings.data_dir,
        extra=settings.models,
        device=settings.device,
        allow_pickle=settings.allow_pickle,
        max_loaded=settings.max_loaded_models,
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")] = Path("out.png"),
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", "-n")] = "",
    steps: Annotated[int, typer.Option(min=1, max=bounds.MAX_STEPS)] = bounds.DEFAULT_STEPS,
    seed: Annotated[int, typer.Option(help="-1 for random.")] = -1,
    width: Annotated[Optional[int], typer.Option(help="Default: the model's native size.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Default: the model's native size.")] = None,
    sampler: Annotated[str, typer.Option(help="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M Karras'.")] = "DPM++ 2M",
    scheduler: Annotated[str, typer.Option(help="Schedule type: automatic, karras, exponential, uniform, sgm_uniform.")] = "automatic",
    cfg_scale: Annotated[float, typer.Option("--cfg-scale")] = 7.0,
    model: Annotated[Optional[str], typer.Option(help="Model name, folder, .safetensors file or hub id.")] = None,
    init_image: Annotated[Optional[Path], typer.Option("--init-image", help="img2img source image.")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Inpaint mask (white = repaint); needs --init-image.")] = None,
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="img2img denoising strength.")] = 0.75,
    models_dir: ModelsDir = None,
    data_dir: DataDir = None,
    device: DeviceOpt = None,
    allow_pickle: AllowPickle = None,
) -> None:
    """Generate one image (or one per --init-image) and write it as a PNG with A1111 infotext."""
    import base64

    from sdserve.core import RequestRejected, inline_inputs
    from sdserve.engine.models import ModelError
    from sdserve.engine.pipeline import Engine, InvalidRequestError
    from sdserve.images import encode_png
    from sdserve.schema import GenerationRequest

    settings = _settings(models_dir=models_dir, data_dir=data_dir, device=device, allow_pickle=allow_pickle)
    if model:
        settings.models = [model, *settings.models]

    def read_b64(path: Optional[Path]) -> Optional[str]:
        if path is None:
            return None
        try:
            return base64.b64encode(path.read_bytes()).decode()
        except OSError as exc:
            _fail(f"cannot read {path}: {exc.strerror}")
            return None

    try:
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed, width=width, height=height,
            sampler=sampler, scheduler=scheduler, cfg_scale=cfg_scale, model=model,
            init_image=read_b64(init_image), mask=read_b64(mask), strength=strength,
        )
        queued, inputs = inline_inputs([request])
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors()))
    except RequestRejected as exc:
        _fail(str(exc))

    engine = Engine(_registry(settings))
    try:
        with console.status(f"loading model {request.model or settings.models[0]}…"):
            engine.registry.load(request.model)
        with Progress(
            TextColumn("[bold]denoising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
        ) as progress:
            task = progress.add_task("steps", total=None)
            result = engine.run(queued, on_step=lambda step, total: progress.update(task, completed=step, total=total),
                                inputs=inputs)
    except (ModelError, InvalidRequestError) as exc:
        _fail(str(exc))
    image = result[0][0]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(encode_png(image.image, image.infotext))
    console.print(f"seed [bold]{image.seed}[/bold]")
    print(output)


@app.command("models")
def list_models(models_dir: ModelsDir = None, data_dir: DataDir = None) -> None:
    """List the models the registry finds, with kind, size and A1111 hash."""
    from sdserve.engine.models import ModelError

    registry = _registry(_settings(models_dir=models_dir, data_dir=data_dir, device="cpu"))
    try:
        models = registry.refresh()
    except ModelError as exc:
        _fail(str(exc))
    table = Table(title=f"models (models dir: {registry.models_dir})")
    for column in ("name", "kind", "arch", "size", "hash", "source"):
        table.add_column(column)
    for info in models:
        kind = info.kind
        if info.is_demo:
            kind = "demo (shapes)"
        elif info.kind == "pickle" and not registry.allow_pickle:
            kind = "pickle (refused; --allow-pickle to load)"
        size = f"{info.size_bytes / 2**20:.1f} MiB" if info.size_bytes is not None else "-"
        table.add_row(info.name, kind, info.arch or "-", size, registry.short_hash(info) or "-", info.source)
    Console().print(table)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Address to bind. [env: SDSERVE_HOST]")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port. [env: SDSERVE_PORT]")] = None,
    model: ModelOpt = None,
    models_dir: ModelsDir = None,
    data_dir: DataDir = None,
    device: DeviceOpt = None,
    api_key: ApiKey = None,
    api_auth: ApiAuth = None,
    max_queue: MaxQueue = None,
    max_work: MaxWork = None,
    rate_limit: RateLimitOpt = None,
    rate_burst: RateBurst = None,
    images_per_minute: ImagesPerMinute = None,
    on_disconnect: OnDisconnect = None,
    keys_file: KeysFile = None,
    moderation: Moderation = None,
    safety_checker: SafetyChecker = None,
    blocklist: Blocklist = None,
    keep_jobs_days: KeepJobsDays = None,
    keep_images_days: KeepImagesDays = None,
    max_batch: MaxBatch = None,
    batch_wait_ms: BatchWait = None,
    optimize: Optimize = None,
    allow_pickle: AllowPickle = None,
    queue: QueueURL = None,
    lease_s: LeaseS = None,
    name: WorkerName = None,
    storage: StorageURL = None,
    public_url: PublicURL = None,
    allowed_hosts: AllowedHosts = None,
    preview_every: PreviewEvery = None,
    webhook_secret: WebhookSecret = None,
    webhook_allow_hosts: WebhookAllowHosts = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="Engine processes: 0 (default) is one per visible GPU, each pinned to its own, and one on "
        "CPU; on a CPU, N processes split the cores. [env: SDSERVE_WORKERS]")] = None,
    sagemaker: Annotated[
        Optional[bool],
        typer.Option("--sagemaker/--no-sagemaker", help="SageMaker container mode: bind 0.0.0.0:$SAGEMAKER_BIND_TO_PORT "
                     "(else 8080), model from /opt/ml/model. [env: SDSERVE_SAGEMAKER]"),
    ] = None,
) -> None:
    """Serve the web UI and every API, with its engine processes, on one host."""
    settings = _settings(
        host=host, port=port, models=model or None, models_dir=models_dir, data_dir=data_dir, device=device,
        api_keys=api_key or None, api_auth=api_auth, max_queue=max_queue, max_work=max_work, allow_pickle=allow_pickle,
        sagemaker=sagemaker, max_batch=max_batch, batch_wait_ms=batch_wait_ms, optimize=optimize, storage=storage,
        queue=queue, lease_s=lease_s, name=name, rate_limit=rate_limit, rate_burst=rate_burst,
        images_per_minute=images_per_minute, on_disconnect=on_disconnect, keys_file=keys_file, moderation=moderation,
        safety_checker=safety_checker, blocklist=blocklist, keep_jobs_days=keep_jobs_days,
        keep_images_days=keep_images_days, public_url=public_url, allowed_hosts=allowed_hosts or None,
        workers=workers, preview_every=preview_every, webhook_secret=webhook_secret,
        webhook_allow_hosts=webhook_allow_hosts or None,
    )
    if settings.sagemaker:
        _sagemaker_defaults(settings, host_given=host is not None, port_given=port is not None, model_given=bool(model))
    _serve_http(settings, "serve")


@app.command()
def api(
    host: Annotated[Optional[str], typer.Option(help="Address to bind. [env: SDSERVE_HOST]")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port. [env: SDSERVE_PORT]")] = None,
    model: Annotated[
        Optional[list[str]],
        typer.Option("--model", help="A model the workers serve, by name; repeat for more, the first is the default. "
                     "Optional: workers publish theirs. [env: SDSERVE_MODELS, comma-separated]"),
    ] = None,
    data_dir: DataDir = None,
    api_key: ApiKey = None,
    api_auth: ApiAuth = None,
    max_queue: MaxQueue = None,
    max_work: MaxWork = None,
    rate_limit: RateLimitOpt = None,
    rate_burst: RateBurst = None,
    images_per_minute: ImagesPerMinute = None,
    on_disconnect: OnDisconnect = None,
    keys_file: KeysFile = None,
    blocklist: Blocklist = None,
    keep_jobs_days: KeepJobsDays = None,
    keep_images_days: KeepImagesDays = None,
    queue: QueueURL = None,
    storage: StorageURL = None,
    public_url: PublicURL = None,
    allowed_hosts: AllowedHosts = None,
    preview_every: PreviewEvery = None,
    webhook_secret: WebhookSecret = None,
    webhook_allow_hosts: WebhookAllowHosts = None,
) -> None:
    """An API replica: the web UI and every API, no engine (no torch, no model files). Needs a shared --queue."""
    settings = _settings(
        host=host, port=port, models=model or None, data_dir=data_dir, api_keys=api_key or None, api_auth=api_auth,
        max_queue=max_queue, max_work=max_work, queue=queue, storage=storage, rate_limit=rate_limit,
        rate_burst=rate_burst, images_per_minute=images_per_minute, on_disconnect=on_disconnect, keys_file=keys_file,
        blocklist=blocklist, keep_jobs_days=keep_jobs_days, keep_images_days=keep_images_days, public_url=public_url,
        allowed_hosts=allowed_hosts or None, preview_every=preview_every, webhook_secret=webhook_secret,
        webhook_allow_hosts=webhook_allow_hosts or None,
    )
    if not model and "SDSERVE_MODELS" not in os.environ:
        settings.models = []  # not "demo": the API offers what the workers publish
    _serve_http(settings, "api")


def _serve_http(settings: Settings, role: str) -> None:
    supervisor = None
    if role == "serve":  # the engine processes' launcher is forked first, while this process has one thread
        from sdserve.supervisor import Supervisor

        supervisor = Supervisor(settings)

    import uvicorn

    from sdserve.api.app import create_app
    from sdserve.service import Service

    try:
        fastapi_app = create_app(settings, Service(settings, role, supervisor))  # type: ignore[arg-type]
    except ValueError as exc:  # a bad --storage URL, an unknown --optimize name, no shared queue, ...
        _fail(str(exc))
    service = fastapi_app.state.service
    auth = fastapi_app.state.keys.describe(users=len(settings.api_auth))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # type: ignore[override]
            # SIGTERM/SIGINT: refuse new jobs at once (503), answer waiting synchronous calls 503 now, and stop the
            # runner meanwhile (the running batch finishes within the grace, else goes back to the queue).
            service.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        fastapi_app, host=settings.host, port=settings.port, log_level="info",
        timeout_graceful_shutdown=int(settings.shutdown_grace_s), access_log=False,
    )
    console.print(f"sdserve {role} on http://{settings.host}:{settings.port}  (models: "
                  f"{', '.join(settings.models) or 'as the workers publish'}; queue: {settings.queue or 'sqlite'}; "
                  f"images: {service.images.location}; auth: {auth})")
    Server(config).run()
    service.shutdown()  # waits for the engine processes (begun by the signal), so none outlives the server


@app.command()
def worker(
    model: ModelOpt = None,
    models_dir: ModelsDir = None,
    data_dir: DataDir = None,
    device: DeviceOpt = None,
    queue: QueueURL = None,
    storage: StorageURL = None,
    name: WorkerName = None,
    lease_s: LeaseS = None,
    max_batch: MaxBatch = None,
    batch_wait_ms: BatchWait = None,
    optimize: Optimize = None,
    allow_pickle: AllowPickle = None,
    moderation: Moderation = None,
    safety_checker: SafetyChecker = None,
    metrics_port: Annotated[
        Optional[int], typer.Option(help="Serve /healthz, /readyz (model loaded) and /metrics on this port "
                                    "(on --host). [env: SDSERVE_METRICS_PORT]"),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Address for --metrics-port. [env: SDSERVE_HOST]")] = None,
) -> None:
    """A GPU worker: takes jobs from the shared queue and runs them; no public HTTP. One per GPU."""
    from sdserve.supervisor import run_worker

    settings = _settings(
        models=model or None, models_dir=models_dir, data_dir=data_dir, device=device, queue=queue, storage=storage,
        name=name, lease_s=lease_s, max_batch=max_batch, batch_wait_ms=batch_wait_ms, optimize=optimize,
        allow_pickle=allow_pickle, host=host, metrics_port=metrics_port, moderation=moderation,
        safety_checker=safety_checker,
    )
    try:
        run_worker(settings, settings.metrics_port)
    except ValueError as exc:
        _fail(str(exc))


def _sagemaker_defaults(settings: Settings, *, host_given: bool, port_given: bool, model_given: bool) -> None:
    """SageMaker runs `docker run IMAGE serve`: listen where it looks, load what it extracted."""
    if not host_given:
        settings.host = "0.0.0.0"
    if not settings.allowed_hosts:
        settings.allowed_hosts = ["*"]  # SageMaker calls by whatever name its endpoint has; no URL uses the Host
    if not port_given:
        settings.port = int(os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080"))
    model_root = Path(os.environ.get("SDSERVE_SAGEMAKER_MODEL_DIR", "/opt/ml/model"))
    if not model_given and model_root.is_dir():
        if (model_root / "model_index.json").is_file():
            settings.models = [str(model_root)]
        else:
            found = sorted(model_root.glob("*.safetensors")) + sorted(p.parent for p in model_root.glob("*/model_index.json"))
            if found:
                settings.models = [str(found[0])]
        settings.models_dir = model_root


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def main() -> None:
    # transformers warns at import time about optional backends (torchvision) sdserve never uses.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
