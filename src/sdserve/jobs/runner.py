"""The runner: one thread per device owns the pipeline, takes batches from the queue and runs them.

Generation happens here, never on the HTTP event loop. Each denoising step reports progress
and is where cancellation, timeouts and shutdown are checked. A job canceled or timed out in
the middle of a batch is dropped at that step (it ends at once, and its images are never
stored); its companions run on.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from PIL import Image

from sdserve.engine.models import ModelError
from sdserve.engine.pipeline import (
    Cancelled,
    Engine,
    GeneratedImage,
    InvalidRequestError,
)
from sdserve.health import WriteHealth
from sdserve.images import ImageDecodeError, decode_image, encode_png
from sdserve.jobs import batcher
from sdserve.jobs.queue import JobQueue, StorageError
from sdserve.moderation import ModerationUnavailable, Moderator, NoModeration, Verdict
from sdserve.schema import ImageRef, Job
from sdserve.storage import ImageStore, StoreError

log = logging.getLogger(__name__)

# How long a batch's images wait for an unreachable image store before their jobs fail.
STORE_RETRY_S = 60.0


class _Stop(Cancelled):
    """Shutdown ran out of grace time: put the batch back for the next start."""


class Runner:
    def __init__(
        self, engine: Engine, queue: JobQueue, images: ImageStore, health: WriteHealth, *,
        default_model: str | None = None, max_batch: int = 1, batch_wait_s: float = 0.0,
        name: str | None = None, heartbeat_s: float = 10.0, moderator: Moderator | None = None,
    ) -> None:
        self.moderator: Moderator = moderator or NoModeration()
        self.name = name or "local"
        self.heartbeat_s = heartbeat_s
        self._batch: list[str] = []
        self._registered = 0.0
        self.engine = engine
        self.queue = queue
        self.images = images
        self.health = health
        self.default_model = default_model
        self.max_batch = max(1, max_batch)
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._loaded = False
        # (images, when the engine finished it, before any of its clients was told): see _companions
        self._last_batch: tuple[int, float] | None = None
        self.load_error: str | None = None
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdserve-runner", daemon=True)
        self.on_batch: Callable[[int], None] | None = None  # told the images of each batch (metrics)
        # Called once the default model has loaded, before the worker counts as ready (retried until it succeeds).
        self.on_ready: Callable[[], None] | None = None
        self._told_ready = False

    @property
    def ready(self) -> bool:
        """The default model is loaded, and the API replicas have been told what this worker serves."""
        return self._loaded and (self._told_ready or self.on_ready is None)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace_s: float = 25.0) -> None:
        """Finish the running batch (within `grace_s`, else stop it and requeue), then exit."""
        self._stopping.set()
        self._thread.join(grace_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(30)

    def _loop(self) -> None:
        try:
            self.engine.warm_up(self.default_model)
            self._loaded = True
        except ModelError as exc:
            # Keep running: the service refuses new jobs with this error, and queued ones fail with it.
            self.load_error = str(exc)
            log.error("cannot load the default model: %s", exc)
        while not self._stopping.is_set():
            try:
                if time.monotonic() - self._registered >= self.heartbeat_s:
                    self._register()
                enough = [self.max_batch]  # a batch this big is claimed at once; a smaller one lingers first

                def select(candidates: Sequence[Job]) -> list[Job]:
                    enough[0] = self._companions(candidates)
                    limit = self.max_batch
                    if self.queue.shared:  # other workers take from this queue: take a share of it
                        idle = max(1, sum(1 for w in self.queue.workers() if w.get("ready") and not w.get("batch")))
                        limit = batcher.fair_share(candidates, self.max_batch, idle)
                        enough[0] = min(enough[0], math.ceil(self.max_batch / idle))
                    return batcher.select(candidates, limit)

                jobs = self.queue.claim(
                    select=select,
                    wait_s=0.25,
                    linger_s=self.batch_wait_s if self.max_batch > 1 else 0.0,
                    full=lambda chosen: batcher.images_in(chosen) >= enough[0],
                    worker=self.name,
                )
                if jobs:
                    self._run(jobs)
            except StorageError as exc:
                self.health.failed(str(exc), full=exc.full)
                time.sleep(0.5)
            except Exception:  # keep the runner alive whatever one batch does
                log.exception("runner loop error")
                time.sleep(0.5)

    def _companions(self, candidates: Sequence[Job]) -> int:
        """How many images a batch may wait `--batch-wait-ms` to gather: as many as can come. Those of the last
        batch (its clients may send their next request as soon as they have their answer) plus those that
        arrived while it ran (other clients, out of step). A lone client's next job has no companion to wait
        for, so it runs at once; sixteen clients in step wait for each other. Before any batch: the most."""
        if self._last_batch is None:
            return self.max_batch
        images, ended = self._last_batch
        meanwhile = sum(job.request.n for job in candidates if job.created_at.timestamp() < ended)
        return max(1, min(self.max_batch, images + meanwhile))

    def _register(self) -> None:
        """Tell the queue this worker is alive, what it serves and what it runs (GET /api/v1/workers)."""
        self._registered = time.monotonic()
        if self._loaded and not self._told_ready and self.on_ready is not None:
            self.on_ready()
            self._told_ready = True
        self.queue.register_worker({
            "name": self.name, "model": self.default_model, "device": self.engine.device, "ready": self.ready,
            "load_error": self.load_error, "batch": list(self._batch), "max_batch": self.max_batch,
        }, ttl_s=3 * self.heartbeat_s)

    def _record(self, end: Callable[..., object], *args: object) -> None:
        """Record a job's end. If the job store cannot write, retry until it can (or shutdown): the job stays
        running meanwhile, and a restart re-runs it; readiness says why."""
        while True:
            try:
                end(*args)
                return
            except StorageError as exc:
                self.health.failed(str(exc), full=exc.full)
                if self._stopping.wait(1.0):
                    return

    def _inputs(self, jobs: Sequence[Job]) -> dict[str, Image.Image]:
        inputs: dict[str, Image.Image] = {}
        for job in jobs:
            for key in job.request.input_images().values():
                if key in inputs:
                    continue
                data = self.images.get(key)
                if data is None:
                    raise InvalidRequestError(f"input image {key} is missing from the image store")
                try:
                    inputs[key] = decode_image(data)
                except ImageDecodeError as exc:
                    raise InvalidRequestError(f"input image {key}: {exc}") from None
        return inputs

    @contextmanager
    def _leased(self, jobs: Sequence[Job]) -> Iterator[None]:
        """While a batch runs, and its images are stored: heartbeat its leases (steps can be slow, loads
        slower) and show it in this worker's registration."""
        done = threading.Event()
        ids = [job.id for job in jobs]

        def heartbeat() -> None:
            while not done.wait(self.heartbeat_s):
                try:
                    self.queue.heartbeat(ids)  # a job that already ended has no lease: a no-op for it
                    self._register()
                except Exception:
                    log.exception("heartbeat failed")

        self._batch = ids
        self._register()
        beater = threading.Thread(target=heartbeat, name="sdserve-heartbeat", daemon=True)
        beater.start()
        try:
            yield
        finally:
            done.set()
            self._batch = []
            try:
                self._register()  # idle again: other workers' shares count this one (batcher.fair_share)
            except StorageError as exc:
                self.health.failed(str(exc), full=exc.full)

    def _keep(self, job: Job, i: int, generated: GeneratedImage, png: bytes, verdict: Verdict) -> ImageRef:
        """Store an image moderation allowed; one it blocked is never stored, only recorded as blocked."""
        width, height = generated.image.size
        if not verdict.allowed:
            log.info("job %s: image %d blocked by moderation: %s", job.id, i, verdict.reason)
            return ImageRef(id=f"{job.id}-{i}", url=None, seed=generated.seed, width=width, height=height,
                            blocked=True, reason=verdict.reason)
        # Keys are the job's: a job run twice (a worker died after storing) stores each image once.
        key = self._put(png, f"{job.id}-{i}")
        return ImageRef(id=key, url=f"/api/v1/images/{key}", seed=generated.seed, width=width, height=height)

    def _put(self, png: bytes, key: str) -> str:
        """Store, riding out a store that is briefly unreachable (S3 restarting, a network blip): retried with
        backoff for up to STORE_RETRY_S while the job's lease is kept, then the job fails clearly. A full disk
        or a refused write is not waited out: it fails at once (507 when full), and readiness says why."""
        deadline = time.monotonic() + STORE_RETRY_S
        pause = 0.25
        while True:
            try:
                return self.images.put(png, key=key)
            except StoreError as exc:
                if not exc.transient or time.monotonic() + pause > deadline or self._abort.is_set():
                    raise
                log.warning("image store: %s; retrying in %.2g s", exc, pause)
                time.sleep(pause)
                pause = min(4.0, pause * 2)

    def _run(self, jobs: Sequence[Job]) -> None:
        with self._leased(jobs):
            self._run_leased(jobs)

    def _run_leased(self, jobs: Sequence[Job]) -> None:
        deadlines = self.queue.deadlines([job.id for job in jobs])
        dropped: set[str] = set()
        started = time.monotonic()
        steps_done = 0
        if self.on_batch is not None:
            self.on_batch(batcher.images_in(jobs))

        def on_step(step: int, steps: int) -> None:
            nonlocal steps_done
            steps_done = step
            if self._abort.is_set():
                raise _Stop()
            now = time.time()
            for job in live():
                if deadlines[job.id] is not None and now > deadlines[job.id]:
                    dropped.add(job.id)
                    limit = deadlines[job.id] - job.created_at.timestamp()
                    self.queue.fail(job.id, f"timed out: its {limit:.0f} s limit (waiting and running) passed",
                                    "timeout")
            for job_id in self.queue.progress([job.id for job in live()], step, steps):
                dropped.add(job_id)
                self.queue.mark_canceled(job_id)
            if len(dropped) == len(jobs):
                raise Cancelled()  # nobody is left to generate for

        def live() -> list[Job]:
            return [job for job in jobs if job.id not in dropped]

        try:
            inputs = self._inputs(jobs)
            results = self.engine.run([job.request for job in jobs], on_step=on_step, inputs=inputs)
            generated_at = time.time()  # before any client hears of its result (see _companions)
        except _Stop:
            for job in live():
                self._record(self.queue.requeue, job.id)
            return
        except Cancelled:
            for job in live():
                self._record(self.queue.mark_canceled, job.id)
            return
        except ModelError as exc:  # the model cannot be loaded: every job of this batch fails alike
            for job in live():
                self._record(self.queue.fail, job.id, f"model unavailable: {exc}", "unavailable")
            return
        except InvalidRequestError as exc:
            if len(jobs) > 1:
                # One bad request must not fail its companions: run each alone to find it.
                for job in live():
                    self._run([job])
                return
            for job in live():
                self._record(self.queue.fail, job.id, str(exc), "invalid")
            return
        except StorageError:
            raise
        except Exception as exc:
            log.exception("generation failed for jobs %s", [j.id for j in jobs])
            for job in live():
                self._record(self.queue.fail, job.id, f"generation failed: {type(exc).__name__}: {exc}", "internal")
            return
        self._last_batch = (batcher.images_in(jobs), generated_at)
        elapsed = time.monotonic() - started
        if steps_done:
            # Seconds per denoising step of one image, so ETAs scale with queued work.
            self.queue.record_speed(elapsed / steps_done / max(1, batcher.images_in(jobs)))
        canceled = self.queue.canceled([job.id for job in live()])
        for job, generated in zip(jobs, results):
            if job.id in dropped or job.id in canceled:
                if job.id not in dropped:
                    self._record(self.queue.mark_canceled, job.id)
                continue
            pngs = [encode_png(g.image, g.infotext) for g in generated]
            try:
                verdicts = self.moderator.check([g.image for g in generated], pngs, job_id=job.id, label=job.label)
            except ModerationUnavailable as exc:
                self._record(self.queue.fail, job.id, str(exc), "unavailable")
                continue
            try:
                refs = [self._keep(job, i, g, png, verdict)
                        for i, (g, png, verdict) in enumerate(zip(generated, pngs, verdicts))]
            except OSError as exc:
                self.health.failed(f"image store: {exc}", full=exc.errno == errno.ENOSPC)
                self._record(self.queue.fail, job.id, f"could not store the images: {exc.strerror or exc}", "storage")
                continue
            self._record(self.queue.succeed, job.id, refs)
