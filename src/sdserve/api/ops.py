"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdserve.api.deps import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Model loaded and queue accepting (else 503 with the reason)")
async def readyz(request: Request, service: ServiceDep) -> JSONResponse:
    ready, reason = await asyncio.to_thread(service.readiness)  # it may wait on Redis: off the event loop
    body = {"status": "ready" if ready else "not ready", "reason": reason}
    keys = getattr(request.app.state, "keys", None)  # the worker's probe app has no auth
    problem = await asyncio.to_thread(keys.check) if keys is not None else None
    if problem:  # said, not a 503: a replica taken out of rotation over a keys-file typo would lock everyone out
        body["warning"] = problem
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
