"""The server core every dialect talks to: validate, submit, wait, cancel, fetch images.

It wires the engine, the queue, the image store and the runner together. Dialects translate
their request into a `GenerationRequest` and call `submit`; synchronous endpoints then `wait`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from sdserve.config import Settings
from sdserve.engine import samplers
from sdserve.engine.models import ModelRegistry, UnknownModelError
from sdserve.engine.noop import NoopEngine
from sdserve.engine.pipeline import Engine
from sdserve.jobs.batcher import default_max_batch
from sdserve.images import ImageDecodeError, decode_image
from sdserve.jobs.events import END_EVENTS
from sdserve.jobs.local import SQLiteJobQueue
from sdserve.jobs.queue import JobQueue
from sdserve.jobs.runner import Runner
from sdserve.schema import GenerationRequest, Job
from sdserve.storage.local import LocalImageStore

log = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """The request is well-formed but cannot run here (unknown model or sampler, unreadable image, over a limit)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Limits:
    """Operator bounds on top of the schema's (they can only tighten them)."""

    max_size: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_pixels: int = 4096 * 4096


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limits = Limits(settings.max_size, settings.max_steps, settings.max_images)
        self.registry = ModelRegistry(
            settings.models_dir, settings.data_dir, extra=settings.models, device=settings.device,
            allow_pickle=settings.allow_pickle, max_loaded=settings.max_loaded_models, optimize=settings.optimize,
        )
        self.engine = NoopEngine(self.registry) if settings.engine == "noop" else Engine(self.registry)
        self.queue: JobQueue = SQLiteJobQueue(
            settings.data_dir / "jobs.db", max_queue=settings.max_queue, default_timeout_s=settings.job_timeout_s,
        )
        self.images = LocalImageStore(settings.data_dir / "images")
        # The model a request without one gets. A1111's options POST changes it for later jobs only:
        # each job pins its model when it is accepted, so a switch never races a running job.
        self.default_model: str | None = settings.models[0] if settings.models else None
        self.runner = Runner(
            self.engine, self.queue, self.images, default_model=settings.models[0] if settings.models else None,
            max_batch=settings.max_batch or default_max_batch(self.registry.device),
            batch_wait_s=settings.batch_wait_ms / 1000,
        )

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        requeued = self.queue.recover()
        if requeued:
            log.info("resuming %d job(s) that were running when the server stopped", requeued)
        self.queue.accepting = True
        self.runner.start()

    def stop_intake(self) -> None:
        self.queue.accepting = False

    def shutdown(self) -> None:
        """Stop intake, finish the running batch, leave queued jobs persisted for the next start."""
        self.stop_intake()
        self.runner.stop(self.settings.shutdown_grace_s)

    def readiness(self) -> tuple[bool, str]:
        if self.runner.load_error:
            return False, f"model failed to load: {self.runner.load_error}"
        if not self.runner.ready:
            return False, f"loading model {self.settings.models[0] if self.settings.models else ''}".strip()
        if not self.queue.accepting:
            return False, "shutting down: not accepting new jobs"
        return True, "ready"

    # ----- requests --------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Reject what would only fail later in the runner, while the client is still here to be told."""
        limits = self.limits
        for field in ("width", "height"):
            value = getattr(request, field)
            if value is not None and value > limits.max_size:
                raise RequestRejected(f"{field} {value} is over this server's limit of {limits.max_size}", field)
        if request.steps > limits.max_steps:
            raise RequestRejected(f"steps {request.steps} is over this server's limit of {limits.max_steps}", "steps")
        if request.n > limits.max_images:
            raise RequestRejected(f"n {request.n} is over this server's limit of {limits.max_images} images", "n")
        try:
            samplers.resolve(request.sampler, request.scheduler)
        except samplers.UnknownSamplerError as exc:
            raise RequestRejected(str(exc), "sampler") from None
        try:
            self.registry.info(request.model)
        except UnknownModelError as exc:
            raise RequestRejected(str(exc), "model") from None
        for field in ("init_image", "mask"):
            data = getattr(request, field)
            if data is not None:
                try:
                    decode_image(data, max_pixels=limits.max_pixels)
                except ImageDecodeError as exc:
                    raise RequestRejected(f"{field}: {exc}", field) from None

    def submit(
        self, request: GenerationRequest, *, source: str = "native", idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        self.validate(request)
        if request.model is None:
            # Pin the model now: a later change of the default does not change what this job draws.
            request = request.model_copy(update={"model": self.registry.info(self.default_model).name})
        return self.queue.submit(request, source=source, idempotency_key=idempotency_key)

    async def wait(self, job_id: str) -> Job:
        """Until the job ends. Subscribes before reading, so the end cannot slip past unseen."""
        with self.queue.events.subscribe(job_id, END_EVENTS) as events:
            job = await asyncio.to_thread(self.queue.get, job_id)
            if not job.status.terminal:
                await events.get()
                job = await asyncio.to_thread(self.queue.get, job_id)
            return job

    async def submit_async(
        self, request: GenerationRequest, *, source: str = "native", idempotency_key: str | None = None
    ) -> tuple[Job, bool]:
        """`submit` off the event loop: it decodes images and writes to disk."""
        return await asyncio.to_thread(self.submit, request, source=source, idempotency_key=idempotency_key)

    async def generate(self, request: GenerationRequest, *, source: str) -> tuple[Job, list[bytes]]:
        """Submit, await, and return the PNGs: the synchronous endpoints' whole path."""
        job, _ = await self.submit_async(request, source=source)
        [(job, pngs)] = await self.results([job.id])
        return job, pngs

    async def submit_all(self, requests: list[GenerationRequest], *, source: str) -> list[Job]:
        """Validate all first, so that none is queued if one is bad; then submit them in order."""
        for request in requests:
            await asyncio.to_thread(self.validate, request)
        return [(await self.submit_async(r, source=source))[0] for r in requests]

    async def results(self, job_ids: list[str]) -> list[tuple[Job, list[bytes]]]:
        """Await every job's end; each with its PNGs (none unless it succeeded)."""
        done = await asyncio.gather(*(self.wait(job_id) for job_id in job_ids))
        return [(job, [self.images.get(ref.id) or b"" for ref in job.images]) for job in done]
