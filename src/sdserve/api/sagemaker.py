"""Amazon SageMaker's container contract: GET /ping, POST /invocations (JSON in; JSON or image/png out)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from sdserve.api import a1111
from sdserve.api.deps import CallerDep, ServiceDep, get_preferences
from sdserve.core import failure_status, public_job
from sdserve.protocols import a1111 as a1111_proto
from sdserve.schema import GenerationRequest, ImageRef, JobStatus
from sdserve.service import Service

router = APIRouter(tags=["sagemaker"])

# Keys only an A1111 payload has; anything else is read as the native request.
A1111_KEYS = frozenset(a1111_proto.Img2ImgRequest.model_fields) - frozenset(GenerationRequest.model_fields)


@router.get("/ping", summary="200 once the model is loaded (SageMaker health check)")
async def ping(service: ServiceDep) -> JSONResponse:
    ready, reason = await asyncio.to_thread(service.readiness)
    return JSONResponse({"status": "healthy" if ready else "unhealthy", "detail": reason},
                        status_code=200 if ready else 503)


@router.post("/invocations", summary="JSON with A1111 txt2img or native fields; JSON with base64 images, or "
                                      "one PNG with Accept: image/png")
async def invocations(request: Request, service: ServiceDep, caller: CallerDep) -> Response:
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"detail": "the body must be JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"detail": "the body must be a JSON object"}, status_code=400)
    wants_png = "image/png" in request.headers.get("accept", "")
    if A1111_KEYS & body.keys():
        try:
            parsed: Any = a1111_proto.Img2ImgRequest(**body) if body.get("init_images") else a1111_proto.Txt2ImgRequest(**body)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        response = await a1111.generate(parsed, request, service, caller, extra=lambda refs: _located(service, refs))
        if not wants_png or response.status_code != 200:
            return response
        import json

        images = json.loads(response.body)["images"]
        return Response(base64.b64decode(images[0]), media_type="image/png") if images else response
    try:
        canonical = GenerationRequest(**body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    prefs = get_preferences(request)
    job, pngs = await service.generate(prefs.apply(canonical), caller, source="sagemaker",
                                       disconnected=request.is_disconnected, wait_s=prefs.wait_s)
    if job.status is not JobStatus.succeeded:
        return JSONResponse({"detail": job.error, "job_id": job.id}, status_code=failure_status(job.error_kind))
    if wants_png:
        return Response(pngs[0], media_type="image/png", headers={"X-Job-Id": job.id})
    located = await asyncio.to_thread(_located, service, job.images)
    return JSONResponse({"images": [base64.b64encode(p).decode() for p in pngs], "job": public_job(job), **located})


def _located(service: Service, refs: list[ImageRef]) -> dict[str, Any]:
    """As SageMaker deployments do, when images go to S3: where each one is, and a presigned URL to fetch it."""
    if not refs or service.image_uri(refs[0].id) is None:
        return {}
    return {"s3": [{"uri": service.image_uri(ref.id), "url": service.image_url(ref.id)} for ref in refs]}
