"""The runner: one thread per engine process owns the pipeline, takes batches from the queue and runs them.

Each denoising step reports progress and is where cancellation, timeouts and shutdown are checked. A job
canceled or timed out in the middle of a batch is dropped at that step (it ends at once, and its images are
never stored); its companions run on.

What needs no tensor is off the runner thread: once a batch's images exist, a finisher thread encodes the PNGs
(with their infotext), has them moderated and stored, and records each job's end, while the runner claims and
computes the next batch. The batch's leases are held until its finisher is done; the finisher is at most one
batch behind (the runner waits for it rather than pile up images).
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import os
import queue as queues
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TypeVar

from PIL import Image

from sdserve.engine import previews
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
from sdserve.jobs.events import Preview
from sdserve.jobs.queue import JobNotFound, JobQueue, Stops, StorageError
from sdserve.moderation import ModerationUnavailable, Moderator, NoModeration, Verdict
from sdserve.schema import ImageRef, Job
from sdserve.storage import ImageStore, StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a batch's images wait for an unreachable image store before their jobs fail.
STORE_RETRY_S = 60.0
# How long a running batch rides out an unreachable job store (Redis restarting, a network blip) before it is
# left to its leases: the batch keeps computing meanwhile, and its progress, cancel checks and end are tried
# again. Past this, another worker re-runs its jobs once the store is back.
QUEUE_RETRY_S = 60.0
# How often a worker whose default model failed to load tries again (free until the model's file changes).
WARM_UP_RETRY_S = 5.0


class RunnerState(enum.Enum):
    """Where a runner's default model stands (`Runner.ready`: it may take jobs)."""

    loading = "loading"  # not loaded yet (the first try is in the loop, before any claim)
    failed = "failed"  # it failed to load (`load_error`); tried again every WARM_UP_RETRY_S
    loaded = "loaded"  # loaded; the API replicas are not told yet (on_ready has not succeeded)
    ready = "ready"  # loaded, and told


class _Stop(Cancelled):
    """Shutdown ran out of grace time: put the batch back for the next start."""


class _LeftToLeases(Cancelled):
    """The job store stayed away past QUEUE_RETRY_S: nothing more is recorded for this batch; its leases run
    out and a worker re-runs its jobs once the store is back. Never a failure: the jobs did nothing wrong."""


class _Outage:
    """The job store as one running batch sees it: each call that fails for the store's sake is ridden out (a
    step's progress is skipped, an end is retried with backoff), and after QUEUE_RETRY_S of failures the batch
    is left to its leases (`_LeftToLeases`). A job the store no longer has (a Redis that came back
    empty, retention) is gone: there is nothing to record for it."""

    # After a failure, skippable calls are not tried again for this long: a store that hangs (rather than
    # refusing) would otherwise cost a socket timeout on every step.
    BACKOFF_S = 1.0

    def __init__(self, health: WriteHealth, stopping: threading.Event) -> None:
        self.health = health
        self.stopping = stopping
        self.since: float | None = None
        self.last_failure = -1e9

    def _failed(self, exc: StorageError) -> None:
        now = self.last_failure = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning("job store unreachable during a batch; the batch goes on: %s", exc)
        self.health.failed(str(exc), full=exc.full)
        self.within_bound()

    def within_bound(self) -> None:
        if self.since is not None and time.monotonic() - self.since > QUEUE_RETRY_S:
            raise _LeftToLeases()

    def _ok(self) -> None:
        if self.since is not None:
            log.info("job store reachable again after %.1f s", time.monotonic() - self.since)
            self.since = None

    def attempt(self, call: Callable[..., T], *args: object, default: T) -> T:
        """One try, or none during the backoff after a failure: `default` then (for what can be skipped, such as
        one step's progress)."""
        if time.monotonic() - self.last_failure < self.BACKOFF_S:
            self.within_bound()
            return default
        try:
            result = call(*args)
        except StorageError as exc:
            self._failed(exc)
            return default
        except JobNotFound:
            return default
        self._ok()
        return result

    def record(self, call: Callable[..., object], *args: object) -> None:
        """Until it is recorded (with backoff), the bound passes (`_LeftToLeases`) or shutdown."""
        pause = 0.25
        while True:
            try:
                call(*args)
            except StorageError as exc:
                self._failed(exc)
                if self.stopping.wait(pause):
                    raise _LeftToLeases() from None
                pause = min(2.0, pause * 2)
                continue
            except JobNotFound as exc:
                log.warning("%s: its end is not recorded", exc)
            self._ok()
            return


class _Reporter:
    """A batch's progress, written by a thread of its own: each step hands its progress over and goes on at once,
    and gets back what the writes so far found (jobs canceled or lost), so a cancel takes effect a step later.
    Every step is written, in order (each is an event a client may watch). On a GPU a step takes milliseconds: a
    write to the job store on the runner thread would cost a share of each."""

    def __init__(self, queue: JobQueue, outage: _Outage, batch_id: str | None) -> None:
        self.queue, self.outage, self.batch_id = queue, outage, batch_id
        self._lock = threading.Condition()
        self._pending: list[tuple[list[str], int, int, dict[str, Image.Image]]] = []
        self._found = Stops(set(), set())
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._write, name="sdserve-progress", daemon=True)
        self._thread.start()

    def report(self, job_ids: list[str], step: int, steps: int, previews: dict[str, Image.Image]) -> Stops:
        """`previews`: pictures due at this step by job id, encoded here, off the runner thread."""
        with self._lock:
            self._pending.append((job_ids, step, steps, previews))
            found, self._found = self._found, Stops(set(), set())
            self._lock.notify_all()
        return found

    def _write(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._lock.wait()
                if not self._pending:
                    return
                pending, self._pending = self._pending, []
                self._busy = True
            found = Stops(set(), set())
            for job_ids, step, steps, pictures in pending:
                job_ids = [job_id for job_id in job_ids if job_id not in found.canceled | found.lost]
                try:
                    encoded = {job_id: _preview(picture) for job_id, picture in pictures.items() if job_id in job_ids}
                    # The store away: this step's progress is skipped and the batch goes on (see _Outage).
                    stops = self.outage.attempt(self.queue.progress, job_ids, step, steps, self.batch_id, encoded,
                                                default=Stops(set(), set()))
                except Exception:  # the bound passed (_LeftToLeases) or worse: the runner thread finds out itself
                    stops = Stops(set(), set())
                found.canceled.update(stops.canceled)
                found.lost.update(stops.lost)
            with self._lock:
                self._found.canceled.update(found.canceled)
                self._found.lost.update(found.lost)
                self._busy = False
                self._lock.notify_all()

    def close(self) -> None:
        """The batch's computation ended: its steps are all written before its jobs' ends (events in order)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            while self._busy or self._pending:
                self._lock.wait()


def _preview(picture: Image.Image) -> Preview:
    image, width, height = previews.encode(picture)
    return {"image": image, "media_type": "image/jpeg", "width": width, "height": height}


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
        self.state = RunnerState.loading
        # (images, when the engine finished it, before any of its clients was told): see _companions
        self._last_batch: tuple[int, float] | None = None
        self._last_run_s: float | None = None  # how long the last batch's computation took
        self.load_error: str | None = None  # why the default model failed to load (state `failed`)
        self._warmed_at = -1e9
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdserve-runner", daemon=True)
        # Batches whose images are made, for the finisher: (finish, the batch's leases to release after it).
        self._finishing: queues.Queue[tuple[Callable[[], None], ExitStack] | None] = queues.Queue(maxsize=1)
        self._finisher = threading.Thread(target=self._finish_loop, name="sdserve-finisher", daemon=True)
        # Publishes this worker's models; called between batches every heartbeat_s. The worker counts as ready
        # once its default model has loaded and a call succeeded.
        self.on_ready: Callable[[], None] | None = None

    @property
    def ready(self) -> bool:
        """The default model is loaded, and the API replicas have been told what this worker serves."""
        return self.state is RunnerState.ready

    def start(self) -> None:
        self._finisher.start()
        self._thread.start()

    def stop(self, grace_s: float = 25.0) -> None:
        """Finish the running batch (within `grace_s`, else stop it and requeue) and store what is made, then exit."""
        self._stopping.set()
        if not self._thread.is_alive():  # never started (the job store never answered), or ended
            return
        started = time.monotonic()
        self._thread.join(grace_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(30)
        self._finishing.put(None)
        self._finisher.join(max(1.0, grace_s - (time.monotonic() - started)))
        if self._finisher.is_alive():
            self._abort.set()  # the image store is away: what is not stored fails now, rather than hold the exit
            self._finisher.join(30)

    def _finish_loop(self) -> None:
        while True:
            item = self._finishing.get()
            if item is None:
                return
            finish, leases = item
            try:
                finish()
            except _LeftToLeases:
                log.warning("job store away for over %.0f s while storing a batch: its jobs are left to their "
                            "leases, to run again once it is back", QUEUE_RETRY_S)
            except Exception:
                log.exception("finishing a batch failed")
            finally:
                leases.close()
    def _warm_up(self) -> None:
        """Load the default model. If it fails, keep running: the model is listed as failed with the reason,
        jobs on it are refused, other models' jobs run, and this is tried again every WARM_UP_RETRY_S (at no
        cost until the model's file changes: the registry remembers the failure)."""
        self._warmed_at = time.monotonic()
        try:
            self.engine.warm_up(self.default_model)
        except Exception as exc:  # a ModelError names the file and why; anything else (CUDA, memory) says what
            reason = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            if self.load_error != reason:
                log.error("cannot load the default model: %s", reason, exc_info=not isinstance(exc, ModelError))
            self.state, self.load_error = RunnerState.failed, reason
            return
        if self.load_error is not None:
            log.info("the default model loads now")
        # With nobody to tell (on_ready None: one process), loaded is ready.
        self.state = RunnerState.loaded if self.on_ready is not None else RunnerState.ready
        self.load_error = None
        self._registered = 0.0  # tell the API replicas at once

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.state in (RunnerState.loading, RunnerState.failed) and (
                        time.monotonic() - self._warmed_at >= WARM_UP_RETRY_S):
                    self._warm_up()
                if time.monotonic() - self._registered >= self.heartbeat_s:
                    self._register(publish=True)
                enough = [self.max_batch]  # a batch this big is claimed at once; a smaller one lingers first

                def select(candidates: Sequence[Job]) -> list[Job]:
                    # other workers may take from this queue: take a share of it
                    idle = max(1, sum(1 for w in self.queue.workers() if w.get("ready") and not w.get("batch")))
                    enough[0] = min(self._companions(candidates), math.ceil(self.max_batch / idle))
                    return batcher.select(candidates, batcher.fair_share(candidates, self.max_batch, idle))

                jobs = self.queue.claim(
                    select=select,
                    wait_s=0.25,
                    linger_s=batcher.linger_s(self.batch_wait_s, self._last_run_s) if self.max_batch > 1 else 0.0,
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
        """How many images a batch may wait (`batcher.linger_s`) to gather: as many as can come. Those of the last
        batch (its clients may send their next request as soon as they have their answer) plus those that
        arrived while it ran (other clients, out of step). A lone client's next job has no companion to wait
        for, so it runs at once; sixteen clients in step wait for each other. Before any batch: the most."""
        if self._last_batch is None:
            return self.max_batch
        images, ended = self._last_batch
        meanwhile = sum(job.request.n for job in candidates if job.created_at.timestamp() < ended)
        return max(1, min(self.max_batch, images + meanwhile))

    def _register(self, publish: bool = False) -> None:
        """Tell the queue this worker is alive, what it serves and what it runs (GET /api/v1/workers). With
        `publish` (from the loop, between batches: never from the heartbeat thread, which must not wait on the
        model registry while a model loads), also what models it has, failed ones included."""
        self._registered = time.monotonic()
        if publish and self.on_ready is not None:
            self.on_ready()  # every time: a Redis that restarted empty learns again what this worker serves
            if self.state is RunnerState.loaded:
                self.state = RunnerState.ready
        self.queue.register_worker({
            "name": self.name, "pid": os.getpid(), "model": self.default_model, "device": self.engine.device,
            "ready": self.ready,
            "state": self.state.value,
            "load_error": self.load_error, "batch": list(self._batch), "max_batch": self.max_batch,
        }, ttl_s=3 * self.heartbeat_s)

    def _inputs(self, jobs: Sequence[Job]) -> dict[str, Image.Image]:
        inputs: dict[str, Image.Image] = {}
        for job in jobs:
            for key in job.request.input_images().values():
                if key in inputs:
                    continue
                data = self._stored(self.images.get, key)
                if data is None:
                    raise InvalidRequestError(f"input image {key} is missing from the image store")
                try:
                    inputs[key] = decode_image(data)
                except ImageDecodeError as exc:
                    raise InvalidRequestError(f"input image {key}: {exc}") from None
        return inputs

    @contextmanager
    def _leased(self, jobs: Sequence[Job]) -> Iterator[None]:
        """While a batch runs, and until its images are stored: heartbeat its leases (steps can be slow, loads
        slower). Entered on the runner thread, left on the finisher's."""
        done = threading.Event()
        ids = [job.id for job in jobs]

        def heartbeat() -> None:
            wait = self.heartbeat_s
            while not done.wait(wait):
                try:
                    self.queue.heartbeat(ids)  # a job that already ended has no lease: a no-op for it
                    self._register()
                    wait = self.heartbeat_s
                except StorageError:
                    wait = min(0.5, self.heartbeat_s)  # renew the lease as soon as the store is back
                except Exception:
                    log.exception("heartbeat failed")

        beater = threading.Thread(target=heartbeat, name="sdserve-heartbeat", daemon=True)
        beater.start()
        try:
            yield
        finally:
            done.set()

    def _keep(self, job: Job, i: int, generated: GeneratedImage, png: bytes, verdict: Verdict) -> ImageRef:
        """Store an image moderation allowed; one it blocked is never stored, only recorded as blocked."""
        width, height = generated.image.size
        if not verdict.allowed:
            log.info("job %s: image %d blocked by moderation: %s", job.id, i, verdict.reason)
            return ImageRef(id=f"{job.id}-{i}", url=None, seed=generated.seed, width=width, height=height,
                            blocked=True, reason=verdict.reason, engine=generated.route.engine,
                            fallback=generated.route.fallback)
        # Keys are the job's: a job run twice (a worker died after storing) stores each image once.
        key = self._put(png, f"{job.id}-{i}")
        return ImageRef(id=key, url=f"/api/v1/images/{key}", seed=generated.seed, width=width, height=height,
                        engine=generated.route.engine, fallback=generated.route.fallback)

    def _put(self, png: bytes, key: str) -> str:
        return self._stored(lambda: self.images.put(png, key=key))

    def _stored(self, call: Callable[..., T], *args: object) -> T:
        """An image store call, riding out a store that is briefly unreachable (S3 restarting, a network blip):
        retried with backoff for up to STORE_RETRY_S while the job's lease is kept, then the job fails clearly.
        A full disk or a refused write is not waited out: it fails at once (507 when full), and readiness says
        why."""
        deadline = time.monotonic() + STORE_RETRY_S
        pause = 0.25
        while True:
            try:
                return call(*args)
            except StoreError as exc:
                if not exc.transient or time.monotonic() + pause > deadline or self._abort.is_set():
                    raise
                log.warning("image store: %s; retrying in %.2g s", exc, pause)
                time.sleep(pause)
                pause = min(4.0, pause * 2)

    @staticmethod
    def _record_all(outage: _Outage, ends: list[tuple[Callable[..., object], tuple[object, ...]]]) -> None:
        for call, args in ends:
            outage.record(call, *args)
        ends.clear()

    def _showing(self, ids: list[str]) -> None:
        """This worker's registration shows the batch it computes (GET /api/v1/workers); empty: idle, so other
        workers' shares count this one (batcher.fair_share)."""
        self._batch = ids
        try:
            self._register()
        except StorageError as exc:  # the heartbeat tries again; the batch runs either way
            self.health.failed(str(exc), full=exc.full)

    def _run(self, jobs: Sequence[Job]) -> None:
        outage = _Outage(self.health, self._stopping)
        leases = ExitStack()
        leases.enter_context(self._leased(jobs))
        finish = None
        self._showing([job.id for job in jobs])
        try:
            finish = self._run_leased(jobs, outage)
        except _LeftToLeases:
            log.warning("job store away for over %.0f s: jobs %s are left to their leases, to run again once it "
                        "is back", QUEUE_RETRY_S, [job.id for job in jobs])
        finally:
            if finish is None:
                leases.close()
            self._showing([])
        if finish is not None:
            self._finishing.put((finish, leases))  # waits while the finisher is a whole batch behind

    def _run_leased(self, jobs: Sequence[Job], outage: _Outage) -> Callable[[], None] | None:
        """Compute the batch; returns what is left to do with its images (for the finisher), or None when every
        job's end is already recorded."""
        # Unreadable now (the store away): no deadline here; the reaper still enforces them once it is back.
        deadlines = outage.attempt(self.queue.deadlines, [job.id for job in jobs], default={})
        batch_id = jobs[0].batch_id
        dropped: set[str] = set()
        unrecorded: list[tuple[Callable[..., object], tuple[object, ...]]] = []  # ends the store missed, for later
        started = time.monotonic()
        steps_done = 0
        reporter = _Reporter(self.queue, outage, batch_id)
        due: dict[str, Image.Image] = {}  # the previews of the step being reported

        def on_preview(step: int, pictures: dict[int, Image.Image]) -> None:
            due.update({jobs[index].id: picture for index, picture in pictures.items()})

        def on_step(step: int, steps: int) -> None:
            nonlocal steps_done
            steps_done = step
            if self._abort.is_set():
                raise _Stop()
            now = time.time()
            ends: list[tuple[Callable[..., object], tuple[object, ...]]] = []
            for job in live():
                deadline = deadlines.get(job.id)
                if deadline is not None and now > deadline:
                    ends.append((self.queue.end_past_deadline, (job.id, job.request.cancel_after_s,
                                                                job.created_at.timestamp(), deadline, "running")))
                    dropped.add(job.id)
            outage.within_bound()  # the store away too long: the batch is left to its leases
            stops = reporter.report([job.id for job in live()], step, steps, dict(due))
            due.clear()
            for job_id in stops.lost - dropped:
                log.info("job %s is no longer this batch's (it ended, or another worker holds it): dropped", job_id)
                dropped.add(job_id)
            for job_id in stops.canceled - dropped:
                dropped.add(job_id)
                ends.append((self.queue.mark_canceled, (job_id,)))
            for call, args in ends:  # one try now; what the store missed is recorded after the batch
                if outage.attempt(call, *args, default=False) is False:
                    unrecorded.append((call, args))
            if len(dropped) == len(jobs):
                raise Cancelled()  # nobody is left to generate for

        def live() -> list[Job]:
            return [job for job in jobs if job.id not in dropped]

        def on_decode() -> None:
            """Before each VAE decoder call (each tile, when tiled): shutdown, and a batch all of whose jobs
            were canceled meanwhile, stop here too, not only between denoising steps."""
            if self._abort.is_set():
                raise _Stop()
            alive = {job.id for job in live()}
            if alive and outage.attempt(self.queue.canceled, list(alive), default=set()) >= alive:
                raise Cancelled()  # every job left was canceled: the Cancelled branch records each


        try:
            try:
                inputs = self._inputs(jobs)
                results = self.engine.run([job.request for job in jobs], on_step=on_step, inputs=inputs,
                                          on_decode=on_decode, on_preview=on_preview)
            finally:
                reporter.close()  # no progress is written after this: the ends come next
            generated_at = time.time()  # before any client hears of its result (see _companions)
        except (_LeftToLeases, StorageError):
            raise
        except _Stop:
            self._record_all(outage, unrecorded)
            for job in live():
                outage.record(self.queue.requeue, job.id)
            return
        except Cancelled:
            self._record_all(outage, unrecorded)
            for job in live():
                outage.record(self.queue.mark_canceled, job.id)
            return
        except StoreError as exc:  # an input image the image store could not give back, even after retries
            self._record_all(outage, unrecorded)
            for job in live():
                outage.record(self.queue.fail, job.id, f"could not read an input image: {exc}", "unavailable")
            return
        except ModelError as exc:  # the model cannot be loaded: every job of this batch fails alike
            for job in live():
                outage.record(self.queue.fail, job.id, f"model unavailable: {exc}", "unavailable")
            return
        except InvalidRequestError as exc:
            if len(jobs) > 1:
                # One bad request must not fail its companions: run each alone to find it.
                for job in live():
                    finish = self._run_leased([job], outage)
                    if finish is not None:
                        finish()
                return None
            for job in live():
                outage.record(self.queue.fail, job.id, str(exc), "invalid")
            return
        except Exception as exc:
            log.exception("generation failed for jobs %s", [j.id for j in jobs])
            for job in live():
                outage.record(self.queue.fail, job.id, f"generation failed: {type(exc).__name__}: {exc}", "internal")
            return
        self._last_batch = (batcher.images_in(jobs), generated_at)
        elapsed = self._last_run_s = time.monotonic() - started
        return lambda: self._finish_batch(jobs, results, dropped, unrecorded, outage, elapsed, steps_done)

    def _finish_batch(self, jobs: Sequence[Job], results: list[list[GeneratedImage]], dropped: set[str],
                      unrecorded: list[tuple[Callable[..., object], tuple[object, ...]]], outage: _Outage,
                      elapsed: float, steps_done: int) -> None:
        """On the finisher thread: each job's PNGs, moderated and stored, and its end recorded."""
        self._record_all(outage, unrecorded)
        if steps_done:
            # Seconds per denoising step of one image, so ETAs scale with queued work (skipped if the store is away).
            outage.attempt(self.queue.record_speed, elapsed / steps_done / max(1, batcher.images_in(jobs)),
                           default=None)
        canceled: set[str] = set()
        outage.record(lambda: canceled.update(self.queue.canceled([job.id for job in jobs if job.id not in dropped])))
        for job, generated in zip(jobs, results):
            if job.id in dropped or job.id in canceled:
                if job.id not in dropped:
                    outage.record(self.queue.mark_canceled, job.id)
                continue
            pngs = [encode_png(g.image, g.infotext, g.postprocessing) for g in generated]
            try:
                verdicts = self.moderator.check([g.image for g in generated], pngs, job_id=job.id, label=job.label)
            except ModerationUnavailable as exc:
                outage.record(self.queue.fail, job.id, str(exc), "unavailable")
                continue
            try:
                refs = [self._keep(job, i, g, png, verdict)
                        for i, (g, png, verdict) in enumerate(zip(generated, pngs, verdicts))]
            except OSError as exc:
                self.health.failed(f"image store: {exc}", full=exc.errno == errno.ENOSPC)
                outage.record(self.queue.fail, job.id, f"could not store the images: {exc.strerror or exc}", "storage")
                continue
            outage.record(self.queue.succeed, job.id, refs)
