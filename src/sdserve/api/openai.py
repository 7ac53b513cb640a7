"""OpenAI Images: generations (JSON), edits (multipart; mask alpha 0 = edit, the opposite of A1111), models."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, ImageOps

from sdserve import bounds
from sdserve.api.deps import CallerDep, ServiceDep
from sdserve.api.urls import ImageLinks, base_url
from sdserve.core import ContentBlocked, RequestRejected, failure_status
from sdserve.images import ImageDecodeError, decode_image, encode_png
from sdserve.keys import Caller
from sdserve.protocols import openai as proto
from sdserve.schema import GenerationRequest, Job, JobStatus
from sdserve.service import Service

router = APIRouter(prefix="/v1", tags=["openai"])
SOURCE = "openai"


def _check_n(n: int, service: Service) -> None:
    if n > service.limits.max_images:
        raise proto.OpenAIError(f"n must be at most {service.limits.max_images} on this server", "n")


async def _respond(request: Request, service: Service, caller: Caller, canonical: GenerationRequest,
                   response_format: str | None) -> dict:
    try:
        job, pngs = await service.generate(canonical, caller, source=SOURCE,
                                           disconnected=request.is_disconnected)
    except RequestRejected as exc:
        raise proto.OpenAIError(str(exc), exc.field, code=_code(exc)) from None
    if job.status is not JobStatus.succeeded:
        raise _job_error(job)
    base = base_url(service.settings, str(request.base_url))
    links: ImageLinks = request.app.state.links
    data = [
        proto.image_data(b64=base64.b64encode(png).decode() if response_format == "b64_json" else None,
                         url=service.image_url(ref.id) or links.url(base, ref.id),
                         prompt=canonical.prompt)
        for ref, png in zip(job.images, pngs)
    ]
    return {"created": int(time.time()), "data": data}


def _code(exc: RequestRejected) -> str | None:
    return "content_policy_violation" if isinstance(exc, ContentBlocked) else None


def _job_error(job: Job) -> proto.OpenAIError:
    status = failure_status(job.error_kind)
    error_type = {422: "invalid_request_error", 409: "canceled", 504: "timeout"}.get(status, "server_error")
    return proto.OpenAIError(job.error or job.status.value, status=400 if status == 422 else status, type=error_type)


@router.post("/images/generations", summary="OpenAI images.generate")
async def generations(body: proto.ImageGenerationRequest, request: Request, service: ServiceDep,
                      caller: CallerDep) -> dict[str, Any]:
    _check_n(body.n, service)
    width, height = proto.parse_size(body.size, service.limits.max_size)
    known = {m.name for m in await asyncio.to_thread(service.models.list)}
    canonical = GenerationRequest(prompt=body.prompt[:4000], model=proto.model_for(body.model, known),
                                  width=width, height=height, n=body.n)
    return await _respond(request, service, caller, canonical, body.response_format or "url")


def _read_upload(value: Any, field: str) -> Image.Image:
    if value is None or isinstance(value, str):
        raise proto.OpenAIError(f"{field} must be an uploaded image file", field)
    try:
        return decode_image(value.file.read())
    except ImageDecodeError as exc:
        raise proto.OpenAIError(f"{field}: {exc}", field) from None


def _edit_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image | None:
    """OpenAI marks the edit area with alpha 0; A1111 (and the canonical request) with white."""
    source = mask if mask is not None else image
    if source.mode not in ("RGBA", "LA", "PA") and "transparency" not in source.info:
        return None if mask is None else ImageOps.invert(source.convert("L"))
    alpha = source.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


@router.post(
    "/images/edits", summary="OpenAI images.edit (multipart: image, mask, prompt, n, size, response_format)",
    openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"],
        "properties": {"image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
                       "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "integer"},
                       "size": {"type": "string"}, "response_format": {"type": "string", "enum": ["url", "b64_json"]},
                       "user": {"type": "string"}}}}}}},
)
async def edits(request: Request, service: ServiceDep, caller: CallerDep) -> dict[str, Any]:
    try:
        form = await request.form(max_files=16, max_fields=64)
    except Exception as exc:  # not multipart, or malformed
        raise proto.OpenAIError(f"expected multipart/form-data: {exc}") from None
    prompt = form.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise proto.OpenAIError("prompt is required", "prompt")
    uploads = form.getlist("image") or form.getlist("image[]")
    if not uploads:
        raise proto.OpenAIError("image is required", "image")
    image = _read_upload(uploads[0], "image")
    mask_upload = form.get("mask")
    mask_image = _read_upload(mask_upload, "mask") if mask_upload is not None else None
    try:
        n = int(form.get("n") or 1)
    except ValueError:
        raise proto.OpenAIError("n must be an integer", "n") from None
    _check_n(max(1, n), service)
    width, height = proto.parse_size(form.get("size") if isinstance(form.get("size"), str) else None,
                                     service.limits.max_size)
    if width is None:
        width, height = (bounds.snap(v, service.limits.max_size) for v in image.size)
    known = {m.name for m in await asyncio.to_thread(service.models.list)}
    model = proto.model_for(form.get("model") if isinstance(form.get("model"), str) else None, known)
    mask = _edit_mask(image, mask_image)
    response_format = form.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise proto.OpenAIError("response_format must be 'url' or 'b64_json'", "response_format")

    def b64(im: Image.Image) -> str:
        return base64.b64encode(encode_png(im)).decode()

    canonical = GenerationRequest(
        prompt=prompt[:4000], model=model, width=width, height=height, n=max(1, n),
        init_image=b64(image.convert("RGB")), mask=b64(mask) if mask is not None else None,
        # An edit regenerates the masked area outright; without any mask it is a whole-image variation.
        strength=1.0 if mask is not None else 0.75, mask_blur=4,
    )
    return await _respond(request, service, caller, canonical, response_format)


@router.get("/models", summary="OpenAI models.list: the models this server can load")
async def models(service: ServiceDep) -> dict[str, Any]:
    infos = await asyncio.to_thread(service.models.list)
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "sdserve"}
                                       for m in infos]}
