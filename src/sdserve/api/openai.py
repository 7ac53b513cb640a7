"""OpenAI Images: generations (JSON), edits (multipart; mask alpha 0 = edit, the opposite of A1111), models."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, ImageOps
from sse_starlette.sse import EventSourceResponse

from sdserve import bounds
from sdserve.api.deps import CallerDep, ServiceDep, get_preferences
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
    prefs = get_preferences(request)
    try:
        job, pngs = await service.generate(prefs.apply(canonical), caller, source=SOURCE,
                                           disconnected=request.is_disconnected, wait_s=prefs.wait_s)
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


async def _stream(request: Request, service: Service, caller: Caller, canonical: GenerationRequest,
                  kind: str, partial_images: int) -> EventSourceResponse:
    """`stream: true`: `partial_images` previews of the forming picture, then each image, as Server-Sent Events.
    Whatever is wrong with the request is answered before the stream starts; a job that fails after is an
    `error` event (the SDK raises it)."""
    canonical = get_preferences(request).apply(canonical)
    canonical.preview_every = proto.partial_every(canonical.steps, partial_images)
    try:
        job, _ = await service.submit_async(canonical, caller, source=SOURCE)
    except RequestRejected as exc:
        raise proto.OpenAIError(str(exc), exc.field, code=_code(exc)) from None

    async def events():
        sent, ended = 0, None
        try:
            async with aclosing(service.watch(job.id, frozenset({"preview"}), after="0")) as items:
                async for item in items:
                    if isinstance(item, Job):
                        ended = item
                        break
                    if sent >= partial_images:
                        continue
                    b64, size = await asyncio.to_thread(_partial, item, canonical)
                    yield _sse(proto.stream_event(kind, "partial_image", b64, size, "jpeg", sent))
                    sent += 1
            if ended is None or ended.status is not JobStatus.succeeded:
                error = _job_error(ended) if ended else proto.OpenAIError("the stream ended", status=500)
                yield _sse(proto.error_body(str(error), error.type, error.param, error.code), "error")
                return
            refused = [ref for ref in ended.images if ref.blocked]
            if refused:
                yield _sse(proto.error_body(f"moderation blocked the image: {refused[0].reason}", param=None,
                                            code="content_policy_violation"), "error")
                return
            for ref in ended.images:
                png = await asyncio.to_thread(service.image, ref.id) or b""
                yield _sse(proto.stream_event(kind, "completed", base64.b64encode(png).decode(),
                                              f"{ref.width}x{ref.height}", "png"))
        finally:
            if ended is None:  # the client went away (or the server stops): nobody will read this job
                await asyncio.to_thread(service.abandon, [job.id])

    return EventSourceResponse(events(), headers={"X-Job-Id": job.id})


def _sse(data: dict[str, Any], event: str | None = None) -> dict[str, str]:
    return {"event": event or data["type"], "data": json.dumps(data)}


def _partial(preview: dict[str, Any], request: GenerationRequest) -> tuple[str, str]:
    """A preview at the picture's size, as the SDK's partial images are: base64 JPEG, WxH. The preview is
    latent-sized (1/8 of a side) and shows a job's images side by side: the first one's is sent."""
    grid = Image.open(io.BytesIO(base64.b64decode(preview["image"]))).convert("RGB")
    cell = grid.crop((0, 0, grid.width // request.n, grid.height))
    width, height = request.width or cell.width * 8, request.height or cell.height * 8
    buffer = io.BytesIO()
    cell.resize((width, height), Image.BILINEAR).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode(), f"{width}x{height}"


def _code(exc: RequestRejected) -> str | None:
    return "content_policy_violation" if isinstance(exc, ContentBlocked) else None


def _job_error(job: Job) -> proto.OpenAIError:
    status = failure_status(job.error_kind)
    error_type = {422: "invalid_request_error", 409: "canceled", 504: "timeout"}.get(status, "server_error")
    return proto.OpenAIError(job.error or job.status.value, status=400 if status == 422 else status, type=error_type)


@router.post("/images/generations", summary="OpenAI images.generate")
async def generations(body: proto.ImageGenerationRequest, request: Request, service: ServiceDep,
                      caller: CallerDep) -> Any:
    _check_n(body.n, service)
    width, height = proto.parse_size(body.size, service.limits.max_size)
    known = {m.name for m in await asyncio.to_thread(service.models.list)}
    canonical = GenerationRequest(prompt=body.prompt[:4000], model=proto.model_for(body.model, known),
                                  width=width, height=height, n=body.n)
    if body.stream:
        return await _stream(request, service, caller, canonical, "image_generation", body.partial_images)
    if body.partial_images:
        raise proto.OpenAIError("partial_images needs stream: true", "partial_images")
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
                       "stream": {"type": "boolean"},
                       "partial_images": {"type": "integer", "minimum": 0, "maximum": proto.MAX_PARTIAL_IMAGES},
                       "user": {"type": "string"}}}}}}},
)
async def edits(request: Request, service: ServiceDep, caller: CallerDep) -> Any:
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
    n_field = form.get("n") or "1"
    try:
        n = int(n_field) if isinstance(n_field, str) else None  # a file in that part is no number either
    except ValueError:
        n = None
    if n is None:
        raise proto.OpenAIError("n must be an integer", "n")
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
    stream = str(form.get("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise proto.OpenAIError("stream must be true or false", "stream")
    field = form.get("partial_images") or "0"
    try:
        partial_images = int(field) if isinstance(field, str) else -1
    except ValueError:
        partial_images = -1
    if not 0 <= partial_images <= proto.MAX_PARTIAL_IMAGES:
        raise proto.OpenAIError(f"partial_images must be an integer from 0 to {proto.MAX_PARTIAL_IMAGES}",
                                "partial_images")
    if partial_images and stream != "true":
        raise proto.OpenAIError("partial_images needs stream: true", "partial_images")

    def b64(im: Image.Image) -> str:
        return base64.b64encode(encode_png(im)).decode()

    canonical = GenerationRequest(
        prompt=prompt[:4000], model=model, width=width, height=height, n=max(1, n),
        init_image=b64(image.convert("RGB")), mask=b64(mask) if mask is not None else None,
        # An edit regenerates the masked area outright; without any mask it is a whole-image variation.
        strength=1.0 if mask is not None else 0.75, mask_blur=4,
    )
    if stream == "true":
        return await _stream(request, service, caller, canonical, "image_edit", partial_images)
    return await _respond(request, service, caller, canonical, response_format)


@router.get("/models", summary="OpenAI models.list: the models this server can load")
async def models(service: ServiceDep) -> dict[str, Any]:
    infos = await asyncio.to_thread(service.models.list)
    return {"object": "list", "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "sdserve"}
                                       for m in infos]}
