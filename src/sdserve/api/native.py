"""The native API under /api/v1: jobs (submit, get, events, cancel), images, synchronous generate."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from sse_starlette.sse import EventSourceResponse

from sdserve import bounds
from sdserve.api.deps import CallerDep, PreferencesDep, ServiceDep
from sdserve.catalog import UnknownModelError
from sdserve.core import failure_status, public_job
from sdserve.engine import samplers
from sdserve.images import media_type
from sdserve.jobs.events import END_EVENTS, job_event
from sdserve.schema import CONTROL_MODULES, GenerationRequest, Job, JobStatus
from sdserve.storage import valid_key

router = APIRouter(prefix="/api/v1", tags=["native"])

PNG = {200: {"content": {"image/png": {}}, "description": "The PNG, with A1111 infotext"}}


@router.post("/jobs", status_code=202, summary="Submit a job", response_model=Job)
async def submit_job(
    body: GenerationRequest, service: ServiceDep, caller: CallerDep, prefs: PreferencesDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JSONResponse:
    """With `Prefer: wait=N`, the answer waits up to N seconds for the job to end: 200 with the ended job, else
    202 with it as it stands (then follow it by its Location)."""
    job, created = await service.submit_async(prefs.apply(body), caller, source="native",
                                              idempotency_key=idempotency_key)
    headers = {"Location": f"/api/v1/jobs/{job.id}"}
    if prefs.wait_s is not None:
        headers["Preference-Applied"] = f"wait={prefs.wait_s:g}"
        try:
            job = await asyncio.wait_for(service.wait(job.id), prefs.wait_s)
        except asyncio.TimeoutError:
            job = await asyncio.to_thread(service.own_job, job.id, caller)
    return JSONResponse(public_job(job), status_code=200 if job.status.terminal or not created else 202,
                        headers=headers)


@router.get("/jobs", summary="Recent jobs, newest first, a page at a time (Link: rel=next)", response_model=list[Job])
async def list_jobs(
    service: ServiceDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    status: JobStatus | None = None,
) -> JSONResponse:
    """The caller's own jobs (an admin key's, and with auth off: everyone's)."""
    jobs = await asyncio.to_thread(service.own_jobs, caller, limit=limit, offset=offset,
                                   status=status.value if status else None)
    headers = {}
    if len(jobs) == limit:  # a full page: there may be older ones (RFC 8288 Link, as GitHub's API pages)
        query = urlencode({"limit": limit, "offset": offset + limit, **({"status": status.value} if status else {})})
        headers["Link"] = f'</api/v1/jobs?{query}>; rel="next"'
    return JSONResponse([public_job(j) for j in jobs], headers=headers)


@router.get("/jobs/{job_id}", summary="A job's status, progress, queue position, ETA and images", response_model=Job)
async def get_job(job_id: str, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    return public_job(await asyncio.to_thread(service.own_job, job_id, caller))


@router.delete("/jobs/{job_id}", summary="Cancel a job (a running one stops at its next step)", response_model=Job)
async def cancel_job(job_id: str, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    return public_job(await asyncio.to_thread(service.cancel_own, job_id, caller))


@router.get("/jobs/{job_id}/events", summary="Server-Sent Events: queued, started, progress…, then the end")
async def job_events(
    job_id: str, service: ServiceDep, caller: CallerDep,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
) -> EventSourceResponse:
    """With a queue that keeps events (Redis), a reconnect with `Last-Event-ID` resumes right after that event,
    on any replica, with no gap and no duplicate."""
    await asyncio.to_thread(service.own_job, job_id, caller)  # 404 (not the caller's, or none) before the stream

    def message(event: dict) -> dict:
        out = {"event": event["type"], "data": json.dumps(event)}
        if event.get("event_id"):
            out["id"] = event["event_id"]
        return out

    async def stream():
        with service.job_events(job_id, after=last_event_id) as events:
            job = await asyncio.to_thread(service.own_job, job_id, caller)
            if last_event_id is None or job.status.terminal:
                first = {JobStatus.queued: "queued", JobStatus.running: "started"}.get(job.status, job.status.value)
                yield {"event": first, "data": json.dumps(job_event(first, job))}
                if job.status.terminal:
                    return
            while True:
                event = await events.get()
                yield message(event)
                if event["type"] in END_EVENTS:
                    return

    return EventSourceResponse(stream())


@router.get("/jobs/{job_id}/webhooks", summary="A job's webhook deliveries: each attempt, its answer or error")
async def job_webhooks(job_id: str, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    """Each attempt: the message id (`webhook-id`, the same on retries), the event, the attempt number, when,
    the receiver's status code or the error, and when the next try is due (null: delivered, or given up)."""
    job = await asyncio.to_thread(service.own_job, job_id, caller)
    attempts = await asyncio.to_thread(service.queue.webhook_log, job_id)
    return {"job_id": job_id, "webhook_url": job.request.webhook_url,
            "events": json.loads(job.request.webhook or "{}").get("events", []), "attempts": attempts}


@router.get("/images/{image_id}", summary="An image by its opaque id (in S3: a redirect to a presigned URL)",
            responses={**PNG, 307: {"description": "Redirect to a presigned URL (S3 storage, image_route=redirect)"}})
async def get_image(image_id: str, request: Request, service: ServiceDep, caller: CallerDep) -> Response:
    """The caller's own job's image; or any image through a signed link (`expires`, `signature`: the OpenAI
    dialect's `url`), which needs no key until it expires."""
    signed = request.scope.get("state", {}).get("signed_image") == image_id
    if not valid_key(image_id) or not (signed or await asyncio.to_thread(service.may_read_image, image_id, caller)):
        raise HTTPException(404, f"no image {image_id!r}")
    if service.settings.image_route == "redirect":
        url = service.image_url(image_id)
        if url is not None:
            return RedirectResponse(url, status_code=307)
    data = await asyncio.to_thread(service.image, image_id)
    if data is None:
        raise HTTPException(404, f"no image {image_id!r}")
    return Response(data, media_type=media_type(data),
                    headers={"Cache-Control": "private, max-age=31536000, immutable"})


@router.post("/generate", summary="Submit, wait, and return the first image as PNG", responses=PNG)
async def generate(body: GenerationRequest, request: Request, service: ServiceDep, caller: CallerDep,
                   prefs: PreferencesDep) -> Response:
    job, pngs = await service.generate(prefs.apply(body), caller, source="native",
                                       disconnected=request.is_disconnected, wait_s=prefs.wait_s)
    return png_response(job, pngs)


def png_response(job: Job, pngs: list[bytes]) -> Response:
    if job.status is not JobStatus.succeeded:
        return JSONResponse({"detail": job.error or job.status.value, "job_id": job.id},
                            status_code=failure_status(job.error_kind))
    return Response(pngs[0], media_type="image/png", headers={
        "X-Job-Id": job.id, "X-Seed": str(job.images[0].seed),
        "X-Image-Ids": ",".join(ref.id for ref in job.images),
    })


@router.get("/workers", summary="Live workers: name, model, device, current batch, last heartbeat")
async def workers(service: ServiceDep, caller: CallerDep) -> list[dict[str, Any]]:
    return await asyncio.to_thread(service.workers, caller)


@router.get("/models", summary="Models the server can load; status loaded|available|failed, with the error")
async def models(service: ServiceDep) -> list[dict[str, Any]]:
    def read() -> tuple[list, str | None, list[str]]:
        infos = service.models.list()
        try:
            default = service.models.info(service.default_model).name
        except UnknownModelError:
            default = None
        return infos, default, service.models.loaded()

    infos, default, loaded = await asyncio.to_thread(read)
    return [
        {"name": m.name, "kind": m.kind, "arch": m.arch, "size_bytes": m.size_bytes, "demo": m.is_demo,
         "default": m.name == default, "loaded": m.name in loaded,
         "status": "failed" if m.error else "loaded" if m.name in loaded else "available", "error": m.error}
        for m in infos
    ]


@router.get("/loras", summary="LoRAs in models/Lora, for the `loras` field or <lora:name:weight> in a prompt")
async def lora_list(service: ServiceDep) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        return [{"name": f.name, "alias": f.alias, "size_bytes": f.path.stat().st_size} for f in service.loras.list()]

    return await asyncio.to_thread(read)


@router.get("/controlnets", summary="ControlNets in models/ControlNet and the preprocessors (modules)")
async def controlnet_list(service: ServiceDep) -> dict[str, Any]:
    files = await asyncio.to_thread(service.controlnets.list)
    return {"models": [f.name for f in files], "modules": list(CONTROL_MODULES)}


@router.get("/limits", summary="This server's bounds on a request (the built-in ones, as its operator tightened them)")
async def limits(service: ServiceDep) -> dict[str, Any]:
    # The fixed ones from bounds.py, then every operator bound (service.Limits) as it is.
    fixed = {"min_size": bounds.MIN_SIZE, "size_step": bounds.SIZE_STEP, "default_steps": bounds.DEFAULT_STEPS}
    return {**fixed, **dataclasses.asdict(service.limits)}


@router.get("/samplers", summary="Samplers (A1111 names) and the schedule types each accepts")
async def sampler_list() -> dict[str, Any]:
    return {
        "samplers": [{"name": s.name, "aliases": list(s.aliases), "default_schedule": s.default_schedule,
                      "schedules": samplers.supported_schedules(s.name)} for s in samplers.SAMPLERS],
        "schedules": [{"name": s.name, "label": s.label} for s in samplers.SCHEDULES],
        "default": GenerationRequest.model_fields["sampler"].default,
    }
