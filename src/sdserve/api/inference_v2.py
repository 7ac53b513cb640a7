"""The Open Inference Protocol v2 (KServe, Triton): health, metadata and infer. Translate, submit, await."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sdserve import __version__
from sdserve.api import tensors
from sdserve.api.deps import CallerDep, ServiceDep
from sdserve.keys import Caller
from sdserve.protocols import inference_v2 as proto
from sdserve.service import Service

router = APIRouter(prefix="/v2", tags=["open-inference-v2"])
SOURCE = "kserve"
HEADER_LENGTH = "Inference-Header-Content-Length"


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": "sdserve", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="The process is up")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="200 when jobs can run (model loaded, queue reachable), else 503")
async def ready(service: ServiceDep) -> JSONResponse:
    is_ready, _ = await asyncio.to_thread(service.readiness)
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)


async def _known(service: Service, name: str, version: str | None) -> str:
    missing = f"unknown model {name!r}" if version is None else f"model {name!r} has no version {version!r}"
    return await tensors.model_named(service, name, version, missing)


@router.get("/models/{name}", summary="Model metadata: inputs and outputs")
async def metadata(name: str, service: ServiceDep) -> dict[str, Any]:
    return proto.model_metadata(await _known(service, name, None))


@router.get("/models/{name}/versions/{version}", summary="Model metadata of one version")
async def version_metadata(name: str, version: str, service: ServiceDep) -> dict[str, Any]:
    return proto.model_metadata(await _known(service, name, version))


async def _ready(name: str, version: str | None, service: Service) -> JSONResponse:
    known = await _known(service, name, version)
    is_ready, _ = await asyncio.to_thread(service.readiness)
    if is_ready:  # the server is; this model may have failed to load (another one is the default)
        is_ready = (await asyncio.to_thread(service.models.info, known)).error is None
    return JSONResponse({"name": known, "ready": is_ready}, status_code=200 if is_ready else 503)


@router.get("/models/{name}/ready", summary="200 when the model can run jobs now, else 503")
async def model_ready(name: str, service: ServiceDep) -> JSONResponse:
    return await _ready(name, None, service)


@router.get("/models/{name}/versions/{version}/ready", summary="Readiness of one version")
async def version_ready(name: str, version: str, service: ServiceDep) -> JSONResponse:
    return await _ready(name, version, service)


INFER_BODY = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"}, "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


async def _infer(name: str, version: str | None, request: Request, service: Service, caller: Caller) -> Response:
    known = await _known(service, name, version)
    header, tail = proto.split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    rows, reply = proto.parse_infer(header, tail, service.limits.max_images)
    images = await tensors.generate(service, caller, rows, known, SOURCE, request)
    body, header_length = proto.encode_response(known, reply, images)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


@router.post("/models/{name}/infer", summary="Infer: a BYTES prompt input (one image each) → BYTES image output",
             openapi_extra=INFER_BODY)
async def infer(name: str, request: Request, service: ServiceDep, caller: CallerDep) -> Response:
    return await _infer(name, None, request, service, caller)


@router.post("/models/{name}/versions/{version}/infer", summary="Infer on one version", openapi_extra=INFER_BODY)
async def infer_version(name: str, version: str, request: Request, service: ServiceDep,
                        caller: CallerDep) -> Response:
    return await _infer(name, version, request, service, caller)
