"""The sd-webui-controlnet extension's routes (`/controlnet/...`), which its clients probe and call beside
`/sdapi/v1`. The units themselves arrive in txt2img/img2img's `alwayson_scripts.controlnet`
(protocols/a1111.py); the native API has a `controlnet` list of the same meaning."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sdserve import bounds, controlnet
from sdserve.api.deps import ServiceDep
from sdserve.api.errors import native_error, respond
from sdserve.images import ImageDecodeError, decode_image, encode_png

router = APIRouter(prefix="/controlnet", tags=["controlnet"])

MAX_DETECT_IMAGES = 8


@router.get("/version")
async def version() -> dict[str, int]:
    return {"version": 2}


@router.get("/model_list", summary="ControlNets in models/ControlNet")
async def model_list(service: ServiceDep) -> dict[str, list[str]]:
    return {"model_list": [f.name for f in await asyncio.to_thread(service.controlnets.list)]}


@router.get("/module_list", summary="Preprocessors")
async def module_list() -> dict[str, Any]:
    detail = {"none": {}, "canny": {"sliders": [{"name": "Low Threshold", "value": 100, "min": 1, "max": 255},
                                                {"name": "High Threshold", "value": 200, "min": 1, "max": 255}]},
              "invert": {}}
    return {"module_list": list(controlnet.MODULES), "module_detail": detail}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)  # what the webuiapi client sends
    controlnet_processor_res: int = bounds.PROCESSOR_RES
    controlnet_threshold_a: float = bounds.CANNY_LOW
    controlnet_threshold_b: float = bounds.CANNY_HIGH


@router.post("/detect", summary="Run a preprocessor: {images: [base64 PNG], info}")
async def detect(body: DetectRequest, service: ServiceDep) -> Any:
    images = body.controlnet_input_images or body.controlnet_images
    if body.controlnet_module not in controlnet.MODULES:
        return _error(f"module {body.controlnet_module!r} is not available here; use one of "
                      f"{', '.join(controlnet.MODULES)}", "controlnet_module")
    if not images or len(images) > MAX_DETECT_IMAGES:
        return _error(f"give 1 to {MAX_DETECT_IMAGES} images in controlnet_input_images", "controlnet_input_images")
    if not bounds.MIN_SIZE <= body.controlnet_processor_res <= bounds.MAX_SIZE:
        return _error(f"controlnet_processor_res must be from {bounds.MIN_SIZE} to {bounds.MAX_SIZE}",
                      "controlnet_processor_res")
    low = body.controlnet_threshold_a if body.controlnet_threshold_a >= 0 else bounds.CANNY_LOW
    high = body.controlnet_threshold_b if body.controlnet_threshold_b >= 0 else bounds.CANNY_HIGH

    def run() -> list[str]:
        out = []
        for data in images:
            image = decode_image(data, max_pixels=service.limits.max_pixels)
            detected = controlnet.detect(body.controlnet_module, image, body.controlnet_processor_res, low, high)
            out.append(base64.b64encode(encode_png(detected)).decode())
        return out

    try:
        return {"images": await asyncio.to_thread(run), "info": "Success"}
    except ImageDecodeError as exc:
        return _error(f"controlnet_input_images: {exc}", "controlnet_input_images")


def _error(detail: str, field: str) -> JSONResponse:
    return respond(native_error, 422, detail, field=field)
