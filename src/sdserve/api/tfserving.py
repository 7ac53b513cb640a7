"""TensorFlow Serving's REST API: model status, metadata and :predict. Translate, submit, await."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request

from sdserve.api import tensors
from sdserve.api.deps import CallerDep, ServiceDep
from sdserve.keys import Caller
from sdserve.protocols import tfserving as proto
from sdserve.protocols.tensors import VERSION, TensorProtocolError
from sdserve.service import Service

router = APIRouter(prefix="/v1/models", tags=["tensorflow-serving"])
SOURCE = "tfserving"


async def _known(service: Service, name: str, version: str | None = None) -> str:
    servable = f"Latest({name})" if version is None else f"Specific({name}, {version})"
    return await tensors.model_named(service, name, version, f"Servable not found for request: {servable}")


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


async def _predict(name: str, version: str | None, request: Request, service: Service,
                   caller: Caller) -> dict[str, Any]:
    known = await _known(service, name, version)
    try:
        body = await request.json()
    except ValueError:
        raise TensorProtocolError("the body must be JSON") from None
    rows, columnar = proto.parse_predict(body, service.limits.max_images)
    images = await tensors.generate(service, caller, rows, known, SOURCE, request)
    return proto.predictions([(base64.b64encode(png).decode(), seed) for png, seed in images], columnar)


@router.post("/{name}:predict", summary="TF Serving predict: {instances: [...]} or {inputs: ...}; one image each")
async def predict(name: str, request: Request, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    return await _predict(name, None, request, service, caller)


@router.post("/{name}/versions/{version}:predict", summary="TF Serving predict on a version")
async def predict_version(name: str, version: str, request: Request, service: ServiceDep,
                          caller: CallerDep) -> dict[str, Any]:
    return await _predict(name, version, request, service, caller)
