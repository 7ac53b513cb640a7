"""The seed routes people already run: `GET /?prompt=` (Flask on a VM) and `POST /generate` +
`GET /download/{id}` (FastAPI in Docker). They submit to the same queue as every other dialect."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field

from sdserve import bounds
from sdserve.api.deps import CallerDep, PreferencesDep, ServiceDep, build_request, get_preferences
from sdserve.api.native import PNG, png_response
from sdserve.core import failure_status
from sdserve.schema import JobStatus
from sdserve.storage import valid_key

router = APIRouter(tags=["simple"])

WEB = Path(__file__).resolve().parent.parent / "web"


@router.get("/", summary="With ?prompt=: generate and return a PNG. Without: the web UI.", responses=PNG)
async def index(
    http: Request,
    service: ServiceDep,
    caller: CallerDep,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    width: int | None = None,
    height: int | None = None,
    scale: float | None = Query(None, description="CFG scale", alias="scale"),
    sampler: str | None = None,
    model: str | None = None,
) -> Response:
    if prompt is None:
        return HTMLResponse((WEB / "index.html").read_text())
    request = build_request(prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed, width=width,
                            height=height, cfg_scale=scale, sampler=sampler, model=model)
    prefs = get_preferences(http)
    job, pngs = await service.generate(prefs.apply(request), caller, source="simple",
                                       disconnected=http.is_disconnected, wait_s=prefs.wait_s)
    return png_response(job, pngs)


class GenerateBody(BaseModel):
    """The body of the FastAPI-in-Docker example: {prompt, scale, steps, seed}."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str
    scale: float = Field(7.5, ge=0, le=30)
    steps: int = Field(50, ge=1, le=bounds.MAX_STEPS)
    seed: int | None = Field(None, ge=-1, strict=True)


@router.post("/generate", summary="Generate; returns {download_id, time} for GET /download/{id}")
async def generate(body: GenerateBody, service: ServiceDep, caller: CallerDep, prefs: PreferencesDep) -> dict:
    started = time.monotonic()
    request = build_request(prompt=body.prompt, cfg_scale=body.scale, steps=body.steps, seed=body.seed)
    job, _ = await service.generate(prefs.apply(request), caller, source="simple", wait_s=prefs.wait_s)
    if job.status is not JobStatus.succeeded:
        raise HTTPException(failure_status(job.error_kind), job.error or job.status.value)
    return {"download_id": job.images[0].id, "time": round(time.monotonic() - started, 3)}


@router.get("/download/{download_id}", summary="The PNG for a download id", responses=PNG)
async def download(download_id: str, service: ServiceDep, caller: CallerDep) -> Response:
    readable = valid_key(download_id) and await asyncio.to_thread(service.may_read_image, download_id, caller)
    data = await asyncio.to_thread(service.image, download_id) if readable else None
    if data is None:
        raise HTTPException(404, f"no image with download id {download_id!r}")
    return Response(data, media_type="image/png",
                    headers={"Content-Disposition": f'attachment; filename="{download_id}.png"'})
