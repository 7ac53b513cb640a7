"""TensorFlow Serving's REST API: model status, metadata and :predict. Translate, submit, await."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, Request

from sdserve.api.deps import ServiceDep, build_request
from sdserve.catalog import UnknownModelError
from sdserve.core import failure_status
from sdserve.protocols import tfserving as proto
from sdserve.protocols.tensors import VERSION
from sdserve.schema import JobStatus
from sdserve.service import Service

router = APIRouter(prefix="/v1/models", tags=["tensorflow-serving"])
SOURCE = "tfserving"


async def _known(service: Service, name: str, version: str | None = None) -> str:
    try:
        info = await asyncio.to_thread(service.models.info, name)
    except UnknownModelError:
        raise proto.TFServingError(f"Servable not found for request: Latest({name})", 404) from None
    if version not in (None, VERSION):
        raise proto.TFServingError(f"Servable not found for request: Specific({name}, {version})", 404)
    return info.name


@router.get("/{name}", summary="TF Serving model status (also OpenAI's models.retrieve)")
async def status(name: str, service: ServiceDep) -> dict[str, Any]:
    known = await _known(service, name)
    # The same path is OpenAI's GET /v1/models/{model}: one body serves both clients, each reading its keys.
    return {**proto.model_status(), "id": known, "object": "model", "created": 0, "owned_by": "sdserve"}


@router.get("/{name}/versions/{version}", summary="TF Serving model status of one version")
async def version_status(name: str, version: str, service: ServiceDep) -> dict[str, Any]:
    await _known(service, name, version)
    return proto.model_status()


@router.get("/{name}/metadata", summary="TF Serving model metadata: the predict signature")
async def metadata(name: str, service: ServiceDep) -> dict[str, Any]:
    known = await _known(service, name)
    return {"model_spec": {"name": known, "version": VERSION},
            "metadata": {"signature_def": {"signature_def": {"serving_default": proto.signature()}}}}


async def _predict(name: str, version: str | None, request: Request, service: Service) -> dict[str, Any]:
    known = await _known(service, name, version)
    try:
        body = await request.json()
    except ValueError:
        raise proto.TFServingError("the body must be JSON") from None
    rows, columnar = proto.parse_predict(body, service.limits.max_images)
    canonical = [build_request(**{**row, "model": known}) for row in rows]
    jobs = await service.submit_all(canonical, source=SOURCE)
    outcomes = await service.results([job.id for job in jobs])
    for job, _ in outcomes:
        if job.status is not JobStatus.succeeded:
            status = failure_status(job.error_kind)
            raise proto.TFServingError(job.error or job.status.value, 400 if status == 422 else status)
    return proto.predictions([(base64.b64encode(pngs[0]).decode(), job.images[0].seed) for job, pngs in outcomes],
                             columnar)


@router.post("/{name}:predict", summary="TF Serving predict: {instances: [...]} or {inputs: ...}; one image each")
async def predict(name: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    return await _predict(name, None, request, service)


@router.post("/{name}/versions/{version}:predict", summary="TF Serving predict on a version")
async def predict_version(name: str, version: str, request: Request, service: ServiceDep) -> dict[str, Any]:
    return await _predict(name, version, request, service)
