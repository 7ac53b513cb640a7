"""Prometheus metrics (names prefixed `sdserve_`, seconds as units), one registry per app."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from sdserve.jobs.events import END_EVENTS
from sdserve.schema import GenerationRequest

# `*_created` series double the output and no dashboard reads them.
disable_created_metrics()

job_log = logging.getLogger("sdserve.jobs")

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], live_workers: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sdserve_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=self.registry)
        self.queue_depth = Gauge("sdserve_queue_depth", "Jobs waiting in the queue", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.workers = Gauge("sdserve_workers", "Live workers (heartbeat within 3 intervals)", registry=self.registry)
        self.workers.set_function(live_workers)
        self.keys_file_problem = Gauge("sdserve_keys_file_problem", "1 while the keys file is missing, unreadable "
                                       "(its keys refused) or broken by an edit (the last good keys kept)",
                                       registry=self.registry)
        self.jobs = Counter("sdserve_jobs", "Jobs whose end this process recorded, by status and caller label (a "
                                          "cluster: sum over API replicas and workers)", ["status", "label"],
                            registry=self.registry)
        self.queue_seconds = Histogram("sdserve_job_queue_seconds", "Time from submission to start",
                                       buckets=_SECONDS, registry=self.registry)
        self.run_seconds = Histogram("sdserve_job_run_seconds", "Time from start to end",
                                     buckets=_SECONDS, registry=self.registry)
        self.images = Counter("sdserve_images", "Images generated and shown, by caller label", ["label"],
                              registry=self.registry)
        self.blocked = Counter("sdserve_images_blocked", "Images moderation withheld, by caller label", ["label"],
                               registry=self.registry)
        self.batch_images = Histogram("sdserve_batch_images", "Images per UNet pass (dynamic batching)",
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self._batches: dict[str, None] = {}  # the batches seen lately (their jobs each start one event)
        self.fallbacks = Counter("sdserve_engine_fallbacks", "Images whose UNet ran on torch although a compiled path "
                                 "was on (engine/accel.py), by reason", ["reason"], registry=self.registry)
        self.submitted = Counter("sdserve_jobs_submitted", "Jobs accepted, by API dialect and caller label",
                                 ["source", "label"], registry=self.registry)
        self.webhooks = Counter("sdserve_webhook_deliveries", "Webhook delivery attempts this process made, by event "
                                "and result (delivered, retrying, given_up)", ["event", "result"],
                                registry=self.registry)

    def on_event(self, event: dict[str, Any]) -> None:
        """EventBus listener: count ends, observe durations, and write the one log line per job."""
        kind = event.get("type")
        if kind == "queued":
            self.submitted.labels(event["source"], event.get("label") or "").inc()
            return
        if kind == "started":
            self.queue_seconds.observe(_seconds(event["created_at"], event["started_at"]))
            if event.get("batch_id") and event["batch_id"] not in self._batches:  # a batch's first job: its size
                self._batches[event["batch_id"]] = None
                self.batch_images.observe(event.get("batch_images") or 1)
                if len(self._batches) > 1024:
                    self._batches.pop(next(iter(self._batches)))
            return
        if kind not in END_EVENTS:
            return
        label = event.get("label") or ""
        self.jobs.labels(kind, label).inc()
        run_s = _seconds(event["started_at"], event["finished_at"]) if event.get("started_at") else None
        if run_s is not None:
            self.run_seconds.observe(run_s)
        if kind == "succeeded":
            blocked = sum(1 for image in event["images"] if image.get("blocked"))
            self.images.labels(label).inc(len(event["images"]) - blocked)
            if blocked:
                self.blocked.labels(label).inc(blocked)
            for image in event["images"]:
                if image.get("fallback"):
                    self.fallbacks.labels(image["fallback"]).inc()
        request = event["request"]
        job_log.info(json.dumps({
            "event": "job", "id": event["id"], "status": kind, "source": event["source"], "label": label,
            "model": request.get("model"), "mode": _mode(request),
            "size": f"{request['width']}x{request['height']}" if request.get("width") else "native",
            "steps": request["steps"], "n": request["n"],
            "queue_wait_s": round(_seconds(event["created_at"], event["started_at"]), 3) if event.get("started_at") else None,
            "run_s": round(run_s, 3) if run_s is not None else None,
            "error": event.get("error"),
        }))


def _mode(request: dict) -> str:
    """GenerationRequest.mode (the one rule) on the event's plain request, without validating it again."""
    return GenerationRequest.model_construct(init_image=request.get("init_image"), mask=request.get("mask"),
                                             extras=request.get("extras")).mode


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
