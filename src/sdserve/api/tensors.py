"""What the TF Serving and v2 dialects share: the model their URL names, and one image per row, awaited."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request

from sdserve.api.deps import build_request, get_preferences
from sdserve.catalog import UnknownModelError
from sdserve.core import failure_status
from sdserve.keys import Caller
from sdserve.protocols.tensors import VERSION, TensorProtocolError
from sdserve.schema import JobStatus
from sdserve.service import Service


async def model_named(service: Service, name: str, version: str | None, missing: str) -> str:
    """The model's name as the server knows it; `missing` (404) for an unknown model or version."""
    try:
        info = await asyncio.to_thread(service.models.info, name)
    except UnknownModelError:
        raise TensorProtocolError(missing, 404) from None
    if version not in (None, VERSION):
        raise TensorProtocolError(missing, 404)
    return info.name


async def generate(service: Service, caller: Caller, rows: list[dict[str, Any]], model: str, source: str,
                   request: Request) -> list[tuple[bytes, int]]:
    """Each row (native request fields) as one job; all validated before any is queued. (PNG, seed) per row,
    or the first failure as the error a synchronous client gets."""
    prefs = get_preferences(request)
    canonical = [prefs.apply(build_request(**{**row, "model": model})) for row in rows]
    jobs = await service.submit_all(canonical, caller, source=source)
    outcomes = await service.results([job.id for job in jobs], request.is_disconnected, wait_s=prefs.wait_s)
    for job, _ in outcomes:
        if job.status is not JobStatus.succeeded:
            status = failure_status(job.error_kind)
            raise TensorProtocolError(job.error or job.status.value, 400 if status == 422 else status)
    return [(pngs[0], job.images[0].seed) for job, pngs in outcomes]
