"""The runner: one thread per device owns the pipeline, takes jobs from the queue and runs them.

Generation happens here, never on the HTTP event loop. Each denoising step reports progress
and is where cancellation, timeouts and shutdown are checked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from sdserve.engine.models import ModelError
from sdserve.engine.pipeline import Cancelled, Engine, InvalidRequestError
from sdserve.images import encode_png
from sdserve.jobs.queue import JobQueue
from sdserve.schema import ImageRef, Job
from sdserve.storage.local import LocalImageStore

log = logging.getLogger(__name__)


class _Stop(Cancelled):
    """Shutdown ran out of grace time: put the job back for the next start."""


class _TimedOut(Cancelled):
    pass


class Runner:
    def __init__(
        self, engine: Engine, queue: JobQueue, images: LocalImageStore, *, default_model: str | None = None,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.images = images
        self.default_model = default_model
        self.ready = False
        self.load_error: str | None = None
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdserve-runner", daemon=True)
        self.current: list[Job] = []

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
            self.engine.registry.load(self.default_model)
            self.ready = True
        except ModelError as exc:
            self.load_error = str(exc)
            log.error("cannot load the default model: %s", exc)
            return
        while not self._stopping.is_set():
            try:
                for job in self.queue.expire():
                    log.info("job %s timed out in the queue", job.id)
                jobs = self.queue.claim(wait_s=0.25)
                if jobs:
                    self._run(jobs)
            except Exception:  # keep the runner alive whatever one batch does
                log.exception("runner loop error")
                time.sleep(0.5)

    def _run(self, jobs: Sequence[Job]) -> None:
        self.current = list(jobs)
        deadlines = {job.id: self.queue.deadline(job.id) for job in jobs}
        started = time.monotonic()
        steps_done = 0

        def on_step(step: int, steps: int) -> None:
            nonlocal steps_done
            steps_done = step
            if self._abort.is_set():
                raise _Stop()
            now = time.time()
            for job in jobs:
                if self.queue.cancel_requested(job.id):
                    raise Cancelled(job.id)
                if deadlines[job.id] is not None and now > deadlines[job.id]:
                    raise _TimedOut(job.id)
                self.queue.progress(job.id, step, steps)

        try:
            results = self.engine.run([job.request for job in jobs], on_step=on_step)
        except _Stop:
            for job in jobs:
                self.queue.requeue(job.id)
            return
        except _TimedOut:
            for job in jobs:
                limit = deadlines[job.id] - job.created_at.timestamp() if deadlines[job.id] else 0
                self.queue.fail(job.id, f"timed out: its {limit:.0f} s limit (waiting and running) passed", "timeout")
            return
        except Cancelled:
            for job in jobs:
                self.queue.mark_canceled(job.id)
            return
        except (InvalidRequestError, ModelError) as exc:
            for job in jobs:
                self.queue.fail(job.id, str(exc), "invalid")
            return
        except Exception as exc:
            log.exception("generation failed for jobs %s", [j.id for j in jobs])
            for job in jobs:
                self.queue.fail(job.id, f"generation failed: {type(exc).__name__}: {exc}", "internal")
            return
        finally:
            self.current = []
        elapsed = time.monotonic() - started
        if steps_done:
            self.queue.record_speed(elapsed / steps_done)
        for job, generated in zip(jobs, results):
            refs = [
                ImageRef(id=(image_id := self.images.put(encode_png(g.image, g.infotext))),
                         url=f"/api/v1/images/{image_id}", seed=g.seed)
                for g in generated
            ]
            self.queue.succeed(job.id, refs)
