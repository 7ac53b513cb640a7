"""The server core every dialect talks to: validate, submit, wait, cancel, fetch images.

It wires the queue, the image store, the model catalog and (except in the `api` role) the engine and
its runner together. Dialects translate their request into a `GenerationRequest` and call `submit`;
synchronous endpoints then `wait`.

Roles: `api` (HTTP only: no engine, neither torch nor diffusers is imported; models come from
`catalog.SharedCatalog`), `worker` (a runner and no public HTTP) and `serve`, which is `api` plus the engine
processes it supervises (supervisor.py), each a `worker` on the same embedded job store.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sdserve import addons, bounds, catalog, core, loras, webhooks
from sdserve import controlnet as control
from sdserve.catalog import ModelCatalog, ModelInfo, SharedCatalog, UnknownModelError
from sdserve.config import Settings
from sdserve.core import ContentBlocked, ModelUnavailable, NotDoneYet, RequestRejected
from sdserve.engine import samplers
from sdserve.health import WriteHealth, probe_folder
from sdserve.images import black_png
from sdserve.jobs import policy
from sdserve.jobs.events import END_EVENTS, Event
from sdserve.jobs.queue import (
    JobFinished,
    JobNotFound,
    JobQueue,
    NotAccepting,
    SharedState,
    ShuttingDown,
    StorageError,
)
from sdserve.keys import Caller
from sdserve.moderation import Blocklist, open_moderator
from sdserve.ratelimit import Limiter, Rate
from sdserve.schema import GenerationRequest, Job, JobStatus
from sdserve.storage import ImageStore, StoreError, open_store
from sdserve.styles import StyleBook, UnknownStyle
from sdserve.upscalers import PickleRefusedError, UnknownUpscalerError, UpscalerCatalog

if TYPE_CHECKING:
    from sdserve.jobs.runner import Runner
    from sdserve.supervisor import Supervisor

log = logging.getLogger(__name__)

Role = Literal["serve", "api", "worker"]

# The shared table of server-wide choices every replica follows (the default model a client switched to).
SERVER_CHOICES = "server"

# How often the reaper fails jobs whose time ran out, whether or not a runner is alive to notice.
REAP_INTERVAL_S = 0.5
# A waiter gives up this long after a job's deadline, even if nothing could record its end.
WAIT_GRACE_S = 15.0
# A waiter reads its job at least this often, whether or not an event came.
WAIT_POLL_S = 2.0
# The event begin_shutdown puts in each synchronous waiter's queue.
_SHUTDOWN = "_shutdown"
# Retention deletes ended jobs this many at a time.
PRUNE_SLICE = 1000
# How often a synchronous call checks that its client is still there.
DISCONNECT_POLL_S = 0.2

Disconnected = Callable[[], Awaitable[bool]]


def native_size(info: ModelInfo | None) -> int:
    """The size a request that gives none gets (each model's own: 64 for the demo, 1024 for SDXL, else 512)."""
    if info is not None and info.is_demo:
        return 64
    return 1024 if info is not None and info.arch == "sdxl" else 512


def request_work(request: GenerationRequest, info: ModelInfo | None) -> float:
    """Images × width × height × steps, in megapixel-steps, the hires pass's denoised steps added. An extras
    upscale denoises nothing: 0 (its output is bounded by size instead: `_bound_extras`)."""
    if request.extras is not None:
        return 0.0
    native = native_size(info)
    width, height = request.width or native, request.height or native
    work = width * height * request.steps
    if request.hires is not None:
        w, h = request.hires.target(width, height)
        work += w * h * max(1, round((request.hires.steps or request.steps) * request.hires.strength))
    return request.n * work / 1e6


@dataclass
class Limits:
    """Operator bounds on top of the schema's (they can only tighten them)."""

    max_size: int = bounds.MAX_SIZE
    max_steps: int = bounds.MAX_STEPS
    max_images: int = bounds.MAX_IMAGES
    max_pixels: int = bounds.MAX_PIXELS
    max_work: float = bounds.DEFAULT_MAX_WORK["cuda"]


def open_queue(settings: Settings) -> JobQueue:
    """The job queue named by `--queue`: sqlite:///path (the default, in the data dir) or redis://…."""
    url = settings.queue or f"sqlite:///{(settings.data_dir / 'jobs.db').resolve()}"
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        from sdserve.jobs.local import SQLiteJobQueue

        return SQLiteJobQueue(Path(url.removeprefix("sqlite://")), max_queue=settings.max_queue,
                              default_timeout_s=settings.job_timeout_s, lease_s=settings.lease_s)
    if scheme in ("redis", "rediss", "unix"):
        from sdserve.jobs.redis import RedisJobQueue

        return RedisJobQueue(url, max_queue=settings.max_queue, default_timeout_s=settings.job_timeout_s,
                             lease_s=settings.lease_s, prefix=settings.queue_prefix)
    raise ValueError(f"--queue {url!r}: use sqlite:///path/jobs.db or redis://host:port/db")


class Service:
    def __init__(self, settings: Settings, role: Role, supervisor: Supervisor | None = None) -> None:
        self.settings = settings
        self.role = role
        self.supervisor = supervisor  # `serve`: the engine processes
        self.limits = Limits(settings.max_size, settings.max_steps, settings.max_images)
        self.queue: JobQueue = open_queue(settings)
        self.shared: SharedState = self.queue  # the same database; the dialects' state needs only this part
        self.images: ImageStore = open_store(settings.storage, settings.data_dir)
        self.blocklist = Blocklist.load(settings.blocklist)
        self.styles = StyleBook([settings.models_dir, settings.data_dir])  # A1111's styles.csv
        self.health = WriteHealth([lambda: probe_folder(settings.data_dir), self.images.probe])
        self.limiter = Limiter(
            self.shared,
            Rate.parse(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None,
            Rate(settings.images_per_minute / 60, settings.images_per_minute) if settings.images_per_minute else None,
        )
        self.runner: Runner | None = None
        if role != "worker":
            self.queue.events.add_listener(self._writes_failed)
        if role in ("api", "serve"):
            self.models: ModelCatalog = SharedCatalog(self.shared, settings.models, settings.allow_pickle)
            self.loras = addons.loras(settings.models_dir)  # listing only: the workers load them
            self.vaes = addons.vaes(settings.models_dir)
            self.embeddings = addons.embeddings(settings.models_dir)
            self.controlnets = addons.controlnets(settings.models_dir)
            self.upscalers = UpscalerCatalog(settings.models_dir, settings.allow_pickle)
        else:
            self._build_runner(settings)
        device = self.runner.engine.device if self.runner is not None else settings.device
        self.limits.max_work = settings.max_work or bounds.DEFAULT_MAX_WORK.get(device, bounds.DEFAULT_MAX_WORK["cuda"])
        self.queue.accepting = False  # until start() has reached the stores and recovered the job store
        self.waiting_for: str | None = "the stores (starting)"  # why start() is still waiting, None once started
        self._intake_closed = False  # stop_intake() was called: nothing may open intake again
        self._start_lock = threading.Lock()
        self._shutdown_lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()  # synchronous calls waiting
        self._waiters_lock = threading.Lock()
        self._stopped = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="sdserve-reaper", daemon=True)
        self._pruner = threading.Thread(target=self._prune_loop, name="sdserve-retention", daemon=True)

    def _build_runner(self, settings: Settings) -> None:
        """The engine side (imports torch): the local model registry, the engine, and the runner over them."""
        from sdserve.engine.models import ModelRegistry
        from sdserve.engine.noop import NoopEngine
        from sdserve.engine.pipeline import Engine
        from sdserve.jobs.batcher import default_max_batch
        from sdserve.jobs.runner import Runner

        registry = ModelRegistry(
            settings.models_dir, settings.data_dir, extra=settings.models, device=settings.device,
            allow_pickle=settings.allow_pickle, max_loaded=settings.max_loaded_models, optimize=settings.optimize,
            compile_cache=settings.compile_cache,
        )
        self.models = registry
        self.loras: addons.AddonCatalog = registry.loras
        self.vaes: addons.AddonCatalog = registry.vaes
        self.embeddings: addons.AddonCatalog = registry.embeddings
        self.controlnets: addons.AddonCatalog = registry.controlnets
        self.upscalers: UpscalerCatalog = registry.upscalers
        engine = (NoopEngine(registry, settings.noop_step_ms / 1000) if settings.engine == "noop"
                  else Engine(registry))
        self.runner = Runner(
            engine, self.queue, self.images, self.health,
            default_model=settings.models[0] if settings.models else None,
            max_batch=settings.max_batch or default_max_batch(registry.device),
            batch_wait_s=settings.batch_wait_ms / 1000,
            name=settings.name or f"{socket.gethostname()}-{os.getpid()}", heartbeat_s=settings.lease_s / 3,
            moderator=open_moderator(settings, registry.device),
        )
        # Once its model loads, a worker tells the API replicas (which have no model files) what it serves.
        self.runner.on_ready = lambda: catalog.publish(self.shared, registry.list(), registry.sha256)

    # ----- the default model -------------------------------------------------------------------
    # The model a request without one gets: the first --model, unless a client chose another (A1111's options
    # POST), which every replica then uses (it lives in the shared state). It changes later jobs only: each job
    # pins its model when it is accepted, so a switch never races a running job.
    @property
    def default_model(self) -> str | None:
        chosen = self.shared.shared_get(SERVER_CHOICES).get("default_model")
        if chosen:
            try:
                return self.models.info(chosen).name
            except UnknownModelError:
                pass  # no longer offered here: fall back to the operator's default
        return self.models.default()

    def choose_default_model(self, name: str) -> str:
        """Every replica's default from now on; UnknownModelError if no such model. Returns its name."""
        info = self.models.info(name)
        self.shared.shared_put(SERVER_CHOICES, "default_model", info.name)
        return info.name

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start with whatever is up yet. The stores may not answer (Redis or S3 starting beside this process):
        then readiness says which, submissions get 503, and a thread keeps trying with backoff; recovery, intake
        and the runner begin once both answer. Never an exit with a traceback."""
        self._reaper.start()
        if self.role != "worker":  # the API side keeps history bounded; workers only make images
            self._pruner.start()
        if self.supervisor is not None:  # the engine processes start beside the API, which listens meanwhile
            threading.Thread(target=self._start_engines, name="sdserve-engines", daemon=True).start()
        if not self._connect():
            threading.Thread(target=self._keep_connecting, name="sdserve-connect", daemon=True).start()

    def _writes_failed(self, event: Event) -> None:
        """A worker could not store a job's images (kind `storage`: a full disk, a refused write): this API process
        refuses submissions too (507) until its own write probe of the stores passes again."""
        if event.get("type") == "failed" and event.get("error_kind") == "storage":
            self.health.failed(event.get("error") or "the image store refused a write", full=True)

    def _start_engines(self) -> None:
        assert self.supervisor is not None
        try:
            self.supervisor.start(self.shared)
        except Exception as exc:
            log.exception("cannot start the engine processes")
            self.waiting_for = f"the engine processes, which could not start: {exc}"

    def _connect(self) -> bool:
        """Reach the image store, recover what the last run left running, then take jobs: False while either
        store cannot be reached. A store that answers but refuses writes (a full disk) is not waited for: the
        write health check reports it, as it does later."""
        try:
            self.images.probe()
        except StoreError as exc:
            if exc.transient:
                return self._waiting(f"the image store: {exc}")
            self.health.failed(f"image store: {exc}", full=exc.errno == errno.ENOSPC)
        try:
            requeued = self.queue.recover()
        except StorageError as exc:
            return self._waiting(str(exc))
        if requeued:
            log.info("resuming %d job(s) that were running when the server stopped", requeued)
        with self._start_lock:  # never reopens intake, or starts the runner, after shutdown began
            if self.waiting_for != "the stores (starting)":
                log.info("the stores answer: starting")
            self.waiting_for = None
            if not self._intake_closed:
                self.queue.accepting = True
                if self.runner is not None:
                    self.runner.start()
        return True

    def _waiting(self, reason: str) -> bool:
        if self.waiting_for != reason:
            log.warning("waiting for %s (retrying)", reason)
        self.waiting_for = reason
        return False

    def _keep_connecting(self) -> None:
        pause = 0.25
        while not self._stopped.wait(pause):
            try:
                if self._connect():
                    return
            except Exception as exc:  # whatever it is, keep trying: readiness says so meanwhile
                log.exception("starting failed; retrying")
                self.waiting_for = f"the stores: {type(exc).__name__}: {exc}"
            pause = min(5.0, pause * 2)

    def stop_intake(self) -> None:
        with self._start_lock:
            self._intake_closed = True
            self.queue.accepting = False

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new jobs, answer every synchronous call still waiting with a 503 now (`ShuttingDown`:
        its jobs are canceled, for its client is told to retry), and start stopping the runner, so that the
        process ends within its grace whatever the HTTP server waits for."""
        first = not self._intake_closed
        self.stop_intake()
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, queue in waiters:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, {"type": _SHUTDOWN})
            except RuntimeError:
                pass  # its loop is gone
        if first:  # a second signal changes nothing
            threading.Thread(target=self.shutdown, name="sdserve-shutdown", daemon=True).start()

    def shutdown(self) -> None:
        """Stop intake, finish the running batch (within the grace, else it goes back to the queue), leave queued
        jobs persisted for the next start. Once: a second call waits for the first."""
        with self._shutdown_lock:
            self.stop_intake()  # from here _connect starts no runner (it checks _intake_closed under the lock)
            self._stopped.set()
            if self.runner is not None:
                self.runner.stop(self.settings.shutdown_grace_s)
            if self.supervisor is not None:
                self.supervisor.stop(self.settings.shutdown_grace_s)

    def _reap(self) -> None:
        """Timeouts hold whether or not a runner is alive (its model failed to load, it is stuck, ...)."""
        while not self._stopped.wait(REAP_INTERVAL_S):
            try:
                for job in self.queue.expire():
                    log.info("job %s timed out", job.id)
            except StorageError as exc:
                self.health.failed(str(exc), full=exc.full)
            except Exception:
                log.exception("reaper error")

    # ----- retention ---------------------------------------------------------------------------
    def prune(self) -> tuple[int, int]:
        """Delete ended jobs older than --keep-jobs-days and images older than --keep-images-days (0: keep);
        returns (jobs, images) deleted."""
        now = time.time()
        jobs = images = 0
        if self.settings.keep_jobs_days:
            while True:  # in slices, so the job store is never locked for long
                deleted = self.queue.prune(now - self.settings.keep_jobs_days * 86400, PRUNE_SLICE)
                jobs += deleted
                if deleted < PRUNE_SLICE:
                    break
        if self.settings.keep_images_days:
            images = self.images.prune(now - self.settings.keep_images_days * 86400)
        return jobs, images

    def _prune_loop(self) -> None:
        """At start, then every --prune-interval-s. API replicas share one turn per interval (a token bucket in
        the queue's store), so a cluster lists its bucket once, not once per replica."""
        interval = self.settings.prune_interval_s
        wait = min(5.0, interval)
        while not self._stopped.wait(wait):
            wait = interval
            try:
                # refilled a little sooner than the interval, so this replica's next turn is never a hair early
                if not self.shared.take_tokens("retention", 1 / (0.9 * interval), 1, 1)[0]:
                    continue
                jobs, images = self.prune()
                if jobs or images:
                    log.info("retention: deleted %d job(s) and %d image(s)", jobs, images)
            except (StorageError, OSError) as exc:
                log.warning("retention: %s (will try again)", exc)
            except Exception:
                log.exception("retention error")

    def readiness(self) -> tuple[bool, str]:
        if self.waiting_for is not None:
            return False, f"starting: waiting for {self.waiting_for}"
        if self.runner is not None and self.runner.load_error:
            return False, f"model failed to load: {self.runner.load_error}"
        if self.runner is not None and not self.runner.ready:
            return False, f"loading model {self.settings.models[0] if self.settings.models else ''}".strip()
        if self.supervisor is not None:
            engines_ready, reason = self.supervisor.readiness()
            if not engines_ready:
                return False, reason
        if not self.queue.accepting:
            return False, "shutting down: not accepting new jobs"
        try:
            self.queue.ping()
        except StorageError as exc:
            return False, str(exc)
        write_error = self.health.check()
        if write_error:
            return False, f"cannot write: {write_error}"
        return True, "ready"

    # ----- a caller's own jobs ------------------------------------------------------------------
    # Every read and cancel goes through these: a caller sees and touches only the jobs it submitted (an admin key
    # sees all, and so does everyone when auth is off: they are one caller). Another caller's job is "not found",
    # never "forbidden", which would confirm that it exists.
    def own_job(self, job_id: str, caller: Caller) -> Job:
        job = self.queue.get(job_id)
        if not caller.owns(job.owner):
            raise JobNotFound(f"no job {job_id!r}")
        return job

    def own_jobs(self, caller: Caller, *, limit: int = 50, offset: int = 0, status: str | None = None) -> list[Job]:
        return self.queue.list(limit=limit, offset=offset, status=status,
                               owner=None if caller.sees_all else caller.id)

    def cancel_own(self, job_id: str, caller: Caller) -> Job:
        self.own_job(job_id, caller)
        return self.queue.cancel(job_id)

    def job_events(self, job_id: str, after: str | None = None) -> AbstractContextManager[asyncio.Queue[Event]]:
        """Subscribe to a job's events (after an event id: a reconnect's Last-Event-ID). Check ownership first."""
        return self.queue.events.subscribe(job_id, after=after)

    # ----- images --------------------------------------------------------------------------------
    def image(self, image_id: str) -> bytes | None:
        """An image's bytes (None: not in the store). Check the caller may read it first (`may_read_image`)."""
        return self.images.get(image_id)

    def image_url(self, image_id: str) -> str | None:
        """A presigned URL, valid for --image-url-ttl-s, where the store can give one (S3); else None."""
        return self.images.url(image_id, self.settings.image_url_ttl_s)

    def image_uri(self, image_id: str) -> str | None:
        """Where the image lives (s3://bucket/key) where the store names it so; else None."""
        return self.images.uri(image_id)

    # ----- what operations watch -------------------------------------------------------------------
    def depth(self) -> int:
        return self.queue.depth()

    def live_workers(self) -> int:
        return len(self.shared.workers())

    def observe(self, on_event: Callable[[Event], None]) -> None:
        """Metrics: every job event this process sees."""
        self.queue.events.add_listener(on_event)

    def workers(self, caller: Caller) -> list[dict]:
        """The live workers; each one's current batch shows only the caller's own jobs."""
        workers = self.shared.workers()
        if not caller.sees_all:
            for worker in workers:
                worker["batch"] = [job_id for job_id in worker.get("batch", []) if self._owns(job_id, caller)]
        return workers

    def _owns(self, job_id: str, caller: Caller) -> bool:
        try:
            self.own_job(job_id, caller)
        except JobNotFound:
            return False
        return True

    def may_read_image(self, image_id: str, caller: Caller) -> bool:
        """A job's image is `<job id>-<i>`: the job's caller's. An uploaded input image (no `-`) is read back by
        the engine only, so only a caller who sees everything may fetch it."""
        if caller.sees_all:
            return True
        job_id, dash, _ = image_id.partition("-")
        return bool(dash) and self._owns(job_id, caller)

    # ----- requests --------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> ModelInfo | None:
        """Reject what would only fail later in the runner, while the client is still here to be told. Returns
        the model the request runs on (resolved once: the default model is shared state), None while no default
        is known yet (an API replica no worker has told of its models)."""
        try:
            info: ModelInfo | None = self.models.info(request.model or self.default_model)
            unknown = None
        except UnknownModelError as exc:
            info, unknown = None, exc
        limits = self.limits
        for field in ("width", "height"):
            value = getattr(request, field)
            if value is not None and value > limits.max_size:
                raise RequestRejected(f"{field} {value} is over this server's limit of {limits.max_size}", field)
        if request.steps > limits.max_steps:
            raise RequestRejected(f"steps {request.steps} is over this server's limit of {limits.max_steps}", "steps")
        if request.hires is not None:
            hires = request.hires
            size = (hires.target(request.width, request.height) if request.width and request.height
                    else (hires.width or 0, hires.height or 0))
            if max(size) > limits.max_size:
                raise RequestRejected(f"hires size {size[0]}x{size[1]} is over this server's limit of "
                                      f"{limits.max_size}", "hires")
            if hires.steps > limits.max_steps:
                raise RequestRejected(f"hires steps {hires.steps} is over this server's limit of {limits.max_steps}",
                                      "hires.steps")
        for field, text in (("prompt", request.prompt), ("hires", request.hires.prompt if request.hires else "")):
            term = self.blocklist.match(text)
            if term is not None:
                raise ContentBlocked(f"the prompt contains {term!r}, which this server does not accept", field)
        if request.n > limits.max_images:
            raise RequestRejected(f"n {request.n} is over this server's limit of {limits.max_images} images", "n")
        self._bound_work(request_work(request, info))
        try:
            samplers.resolve(request.sampler, request.scheduler)
        except samplers.UnknownSamplerError as exc:
            raise RequestRejected(str(exc), "sampler") from None
        try:
            _, tagged = loras.split_prompt(request.prompt)
        except loras.LoraTagError as exc:
            raise RequestRejected(str(exc), "prompt") from None
        # Add-ons by name, now, while the client is here (A1111 answers 422 at once too), not as a failed job.
        wanted = [(self.loras, ref.name, "loras") for ref in request.loras]
        wanted += [(self.loras, ref.name, "prompt") for ref in tagged]
        wanted += [(self.vaes, request.vae, "vae")] if request.vae else []
        wanted += [(self.controlnets, control.model_name(unit.model), f"controlnet.{i}.model")
                   for i, unit in enumerate(request.controlnet)]
        upscalers = [(name, "extras") for name in request.extras.upscalers()] if request.extras else []
        upscalers += [(request.hires.upscaler, "hires.upscaler")] if request.hires else []
        for name, field in upscalers:
            try:
                self.upscalers.check(name, latent=field == "hires.upscaler")
            except (UnknownUpscalerError, PickleRefusedError) as exc:
                if self.role == "api" and not any(f.is_dir() for f in self.upscalers.folders):
                    continue  # as below: an API replica without the folders leaves it to the workers
                raise RequestRejected(str(exc.args[0]), field) from None
        for catalog_, name, field in wanted:
            if not catalog_.folder.is_dir() and self.role == "api":
                continue  # an API replica without the models folder: the workers check it when they load it
            try:
                catalog_.get(name)
            except KeyError as exc:
                raise RequestRejected(str(exc.args[0]), field) from None
        if info is None:
            if request.model is not None:
                raise RequestRejected(str(unknown), "model")
            raise NotAccepting(str(unknown))  # no default anywhere yet: 503, try again once a worker has started
        if info.error is not None:  # a named model, or the default, failed to load
            raise ModelUnavailable(f"model {info.name!r} failed to load: {info.error}", named=request.model is not None)
        return info

    def styled(self, request: GenerationRequest) -> GenerationRequest:
        """The request with its `styles` applied to its prompts (the hires pass's too, where it has its own); the
        job keeps the names. An unknown style is a 422 naming it."""
        if not request.styles:
            return request
        try:
            prompt, negative = self.styles.apply(request.styles, request.prompt, request.negative_prompt)
            fields = request.model_dump(exclude_unset=True) | {"prompt": prompt, "negative_prompt": negative}
            if request.hires is not None and (request.hires.prompt or request.hires.negative_prompt):
                hires_prompt, hires_negative = self.styles.apply(request.styles, request.hires.prompt,
                                                                 request.hires.negative_prompt)
                fields["hires"] = request.hires.model_dump() | {"prompt": hires_prompt,
                                                               "negative_prompt": hires_negative}
        except UnknownStyle as exc:
            raise RequestRejected(str(exc.args[0]), "styles") from None
        return GenerationRequest.model_validate(fields)

    def _check_webhook(self, request: GenerationRequest, caller: Caller | None) -> None:
        """A webhook the server could never deliver is refused now: no secret to sign it, or an address that is
        not public (a name is resolved, and checked, at each delivery)."""
        if request.webhook_url is None:
            return
        if not ((caller.webhook_secret if caller else None) or self.settings.webhook_secret):
            raise RequestRejected("webhooks need a signing secret, and this server has none: the operator starts it "
                                  "with --webhook-secret (or gives the key a webhook_secret)", "webhook_url")
        blocked = webhooks.literal_blocked(request.webhook_url, self.settings.webhook_allow_hosts)
        if blocked:
            raise RequestRejected(blocked, "webhook_url")

    def _bound_extras(self, request: GenerationRequest, inputs: dict[str, core.InputImage]) -> None:
        """An extras upscale's result, and the upscaled picture it is cut from, within the size limits."""
        if request.extras is None or "init_image" not in inputs:
            return
        size = inputs["init_image"].image.size
        out, upscaled = request.extras.output(*size), request.extras.upscaled(*size)
        if min(out) < 1:
            raise RequestRejected(f"extras: upscaling {size[0]}x{size[1]} that way leaves no picture", "extras")
        if max(out) > self.limits.max_size or upscaled[0] * upscaled[1] > self.limits.max_pixels:
            raise RequestRejected(f"extras: the result ({out[0]}x{out[1]}, upscaled from {size[0]}x{size[1]} to "
                                  f"{upscaled[0]}x{upscaled[1]}) is over this server's limit of {self.limits.max_size} "
                                  f"a side", "extras")

    def _bound_work(self, work: float) -> None:
        if work > self.limits.max_work:
            raise RequestRejected(
                f"this request is {work:.1f} megapixel-steps of work (images × width × height × steps, the hires "
                f"pass included), over this server's limit of {self.limits.max_work:g} per request, which is what "
                "its device finishes within the job timeout; ask for fewer or smaller images or fewer steps (the "
                "operator can raise it with --max-work)", "n")

    def submit(
        self, request: GenerationRequest, caller: Caller | None, *, source: str = "native",
        idempotency_key: str | None = None, inputs: dict[str, core.InputImage] | None = None, charge: bool = True,
        styled: bool = False,
    ) -> tuple[Job, bool]:
        """Validate, charge the images to the caller's rate limit, move the input images to the image store,
        pin seed and model, and queue. `inputs`: the request's images if already read by `core.read_inputs`
        (so they are decoded once, and bounded: `_bound_extras`); `charge` False: the caller paid already, `styled`
        True: the styles are applied already (both `submit_all`)."""
        write_error = self.health.check()
        if write_error:
            raise StorageError(f"cannot accept jobs: {write_error}", full=self.health.full)
        if not styled:
            request = self.styled(request)
        info = self.validate(request)
        self._check_webhook(request, caller)
        if idempotency_key is not None and caller is not None and caller.account:
            idempotency_key = f"{caller.account}:{idempotency_key}"  # one caller's keys never reach another's job
        fingerprint = core.fingerprint(request) if idempotency_key is not None else None
        if idempotency_key is not None:
            existing = self.queue.idempotent(idempotency_key, fingerprint)
            if existing is not None:
                return existing, False
        if inputs is None:
            inputs = core.read_inputs(request, self.limits.max_pixels)
            self._bound_extras(request, inputs)
        if charge:
            self.limiter.charge_images(caller, request.n)
        try:
            keys = {field: self.images.put(item.raw) for field, item in inputs.items()}
        except OSError as exc:
            self.health.failed(f"image store: {exc}", full=exc.errno == errno.ENOSPC)
            raise StorageError(f"cannot store the input image: {exc.strerror or exc}",
                               full=exc.errno == errno.ENOSPC) from None
        init = inputs.get("init_image")
        # Pin the model now (validate resolved it): a later change of the default does not change what this job draws.
        model = info.name
        queued = core.job_request(request, model=model, keys=keys, init_size=init.image.size if init else None)
        if queued.preview_every is None:
            queued.preview_every = self.settings.preview_every
        if caller is not None:  # the key's priority caps the job's (keys file)
            queued.priority = caller.priority_for(request.priority, "priority" in request.model_fields_set)
        try:
            return self.queue.submit(queued, source=source, idempotency_key=idempotency_key, fingerprint=fingerprint,
                                     owner=caller.id if caller else "", label=caller.label if caller else None,
                                     weight=caller.weight if caller else 1.0)
        except StorageError as exc:
            self.health.failed(str(exc), full=exc.full)
            raise

    async def wait(self, job_id: str) -> Job:
        """Until the job ends (`watch`, seeing none of its other events)."""
        async with aclosing(self.watch(job_id)) as items:
            async for item in items:
                if isinstance(item, Job):
                    return item
        raise AssertionError("watch ends with the job")  # pragma: no cover

    async def watch(self, job_id: str, types: frozenset[str] = frozenset(),
                    after: str | None = None) -> AsyncIterator[Event | Job]:
        """The job's events of `types` as they come (after an event id; "0": all of them, for a job just
        submitted), then, last, the job as it ended. Subscribes before reading, so the end cannot slip past
        unseen. Never hangs: past the job's deadline (plus a grace) a job nothing could end is reported as timed
        out."""
        with self.queue.events.subscribe(job_id, types | END_EVENTS, after=after) as events, \
                self._waiting_on(events):
            job = await asyncio.to_thread(self.queue.get, job_id)
            deadline = (await asyncio.to_thread(self.queue.deadlines, [job_id]))[job_id]
            read_at = time.monotonic()
            while not job.status.terminal:
                given_up = None if deadline is None else deadline + WAIT_GRACE_S
                # Read the job at least every WAIT_POLL_S, whatever events come: an end whose event was lost (the
                # store failed between recording the end and publishing it) is still seen.
                due = read_at + WAIT_POLL_S - time.monotonic()
                timeout = due if given_up is None else min(due, given_up - time.time())
                try:
                    event = await asyncio.wait_for(events.get(), max(0.05, timeout))
                    if event["type"] == _SHUTDOWN:
                        raise ShuttingDown("the server is shutting down: this call's jobs are canceled; send it "
                                           "again shortly (another replica, or this one once it is back)")
                    if event["type"] in END_EVENTS:  # the end's event holds the job as it ended: no read needed
                        yield Job.model_validate({k: v for k, v in event.items() if k not in ("type", "event_id")})
                        return
                    yield event
                    if time.monotonic() - read_at < WAIT_POLL_S:
                        continue
                except asyncio.TimeoutError:
                    pass
                try:
                    job = await asyncio.to_thread(self.queue.get, job_id)
                except StorageError:
                    pass  # the store is away: wait on (its events or the next read tell the end)
                read_at = time.monotonic()
                if not job.status.terminal and given_up is not None and time.time() > given_up:
                    # nothing could record its end (see /readyz): reported as the deadline would have ended it
                    ended, error, kind = policy.past_deadline(job.request.cancel_after_s, job.created_at.timestamp(),
                                                              deadline, job.status.value)
                    yield job.model_copy(update={"status": JobStatus(ended), "error_kind": kind,
                                                 "error": f"{error}, and its end could not be recorded"})
                    return
            yield job

    @contextmanager
    def _waiting_on(self, events: asyncio.Queue) -> Iterator[None]:
        """A synchronous call's wait, told by begin_shutdown when the server stops."""
        entry = (asyncio.get_running_loop(), events)
        with self._waiters_lock:
            self._waiters.add(entry)
        try:
            if self._intake_closed:
                raise ShuttingDown("the server is shutting down; send this again shortly")
            yield
        finally:
            with self._waiters_lock:
                self._waiters.discard(entry)

    async def submit_async(
        self, request: GenerationRequest, caller: Caller | None, *, source: str = "native",
        idempotency_key: str | None = None,
    ) -> tuple[Job, bool]:
        """`submit` off the event loop: it decodes images and writes to disk."""
        return await asyncio.to_thread(self.submit, request, caller, source=source, idempotency_key=idempotency_key)

    async def generate(self, request: GenerationRequest, caller: Caller | None, *, source: str,
                       disconnected: Disconnected | None = None, wait_s: float | None = None) -> tuple[Job, list[bytes]]:
        """Submit, await, and return the PNGs: the synchronous endpoints' whole path."""
        job, _ = await self.submit_async(request, caller, source=source)
        [(job, pngs)] = await self.results([job.id], disconnected, wait_s=wait_s)
        return job, pngs

    async def _watch(self, job_ids: list[str], disconnected: Disconnected) -> None:
        while not await disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        await asyncio.to_thread(self.abandon, job_ids)

    def _cancel_all(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            try:
                self.queue.cancel(job_id)
            except (JobNotFound, JobFinished, StorageError):
                continue

    def abandon(self, job_ids: list[str]) -> None:
        """The client of a synchronous call went away: its jobs still queued are canceled; running ones finish
        (their images stay in the job history) or, with `--on-disconnect cancel`, stop at their next step."""
        for job_id in job_ids:
            try:
                job = self.queue.cancel(job_id, running=self.settings.on_disconnect == "cancel")
            except (JobNotFound, JobFinished):
                continue  # ended meanwhile
            log.info("job %s (%s): its client disconnected; --on-disconnect %s", job_id, job.status.value,
                     self.settings.on_disconnect)

    async def submit_all(self, requests: list[GenerationRequest], caller: Caller | None, *, source: str) -> list[Job]:
        """Validate all first, so that none is queued if one is bad; then submit them in order."""

        def read(request: GenerationRequest) -> tuple[GenerationRequest, dict[str, core.InputImage], float]:
            styled = self.styled(request)
            info = self.validate(styled)  # cheap: bounds and names; submit checks again
            self._check_webhook(styled, caller)
            inputs = core.read_inputs(styled, self.limits.max_pixels)
            self._bound_extras(styled, inputs)
            return styled, inputs, request_work(styled, info)

        read_all = [await asyncio.to_thread(read, r) for r in requests]
        if len(requests) > 1:  # the bound is the call's (A1111's n_iter, a TF Serving body's instances), not each job's
            self._bound_work(sum(work for _, _, work in read_all))
        await asyncio.to_thread(self.limiter.charge_images, caller, sum(r.n for r in requests))
        jobs: list[Job] = []
        try:
            for r, i, _ in read_all:
                jobs.append((await asyncio.to_thread(self.submit, r, caller, source=source, inputs=i, charge=False,
                                                     styled=True))[0])
        except BaseException:  # intake closed or the queue filled midway: the call fails whole, nothing left queued
            await asyncio.to_thread(self._cancel_all, [job.id for job in jobs])
            raise
        return jobs

    async def results(self, job_ids: list[str], disconnected: Disconnected | None = None,
                      blocked: Literal["refuse", "black"] = "refuse",
                      wait_s: float | None = None) -> list[tuple[Job, list[bytes]]]:
        """Await every job's end; each with its PNGs (none unless it succeeded). `disconnected`: whether the
        synchronous client has gone (Starlette's `request.is_disconnected`); if it goes, its jobs are
        abandoned (`abandon`) rather than run for nobody. An image moderation blocked: ContentBlocked
        (`refuse`), or a black picture of its size in its place (`black`, as A1111 answers)."""
        watcher = asyncio.create_task(self._watch(job_ids, disconnected)) if disconnected is not None else None
        try:
            # `wait_s` (the client's Prefer: wait): past it the client is told where its jobs are; they go on
            done = await asyncio.wait_for(asyncio.gather(*(self.wait(job_id) for job_id in job_ids)), wait_s)
        except asyncio.TimeoutError:
            raise NotDoneYet(job_ids, wait_s or 0) from None
        except ShuttingDown:
            await asyncio.to_thread(self._cancel_all, job_ids)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        refused = [ref for job in done for ref in job.images if ref.blocked]
        if refused and blocked == "refuse":
            raise ContentBlocked(f"moderation blocked {len(refused)} of the images: {refused[0].reason}")

        def read(job: Job) -> list[bytes]:
            return [black_png(ref.width or 64, ref.height or 64) if ref.blocked else self.images.get(ref.id) or b""
                    for ref in job.images]

        return [(job, await asyncio.to_thread(read, job)) for job in done]
