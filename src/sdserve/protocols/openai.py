"""OpenAI Images wire format: /v1/images/generations and /v1/images/edits."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sdserve import bounds


class OpenAIError(ValueError):
    """Rendered as OpenAI's envelope {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.type, self.code = param, status, type, code


MAX_PARTIAL_IMAGES = 3  # what OpenAI's API allows


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(..., max_length=32000)
    model: str | None = None
    n: int = Field(1, ge=1, le=10)
    size: str | None = "auto"
    response_format: Literal["url", "b64_json"] | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=MAX_PARTIAL_IMAGES, description="Streaming: previews sent before the "
                                "image.")


OPENAI_MODEL_NAMES = ("dall-e-2", "dall-e-3", "gpt-image-1")


def parse_size(size: str | None, max_size: int) -> tuple[int | None, int | None]:
    """"WxH" (any multiple of 8 within bounds) or "auto"/None for the model's native size."""
    if size in (None, "", "auto"):
        return None, None
    try:
        width_s, height_s = size.lower().split("x")
        width, height = int(width_s), int(height_s)
    except ValueError:
        raise OpenAIError(f"size {size!r} must look like '512x512' or be 'auto'", "size") from None
    for value in (width, height):
        if value % bounds.SIZE_STEP or not bounds.MIN_SIZE <= value <= max_size:
            raise OpenAIError(f"size {size!r}: width and height must be multiples of {bounds.SIZE_STEP} from "
                              f"{bounds.MIN_SIZE} to {max_size}", "size")
    return width, height


def model_for(requested: str | None, known: set[str]) -> str | None:
    """An sdserve model name, or None (the server's default) for OpenAI's own model names."""
    if requested is None or requested in OPENAI_MODEL_NAMES or requested.startswith(("dall-e", "gpt-image")):
        return None
    if requested not in known:
        raise OpenAIError(f"model {requested!r} does not exist; GET /v1/models lists them", "model", 404,
                          code="model_not_found")
    return requested


def image_data(*, b64: str | None, url: str | None, prompt: str) -> dict[str, Any]:
    item: dict[str, Any] = {"revised_prompt": prompt}
    if b64 is not None:
        item["b64_json"] = b64
    else:
        item["url"] = url
    return item


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# The usage block the SDK's completed events carry (GPT image models count tokens; a diffusion model has none).
NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}


def stream_event(kind: Literal["image_generation", "image_edit"], stage: Literal["partial_image", "completed"],
                 b64: str, size: str, output_format: str, index: int | None = None) -> dict[str, Any]:
    """One event of a streamed generation or edit, as the openai SDK parses it (its event name is `type`)."""
    event: dict[str, Any] = {"type": f"{kind}.{stage}", "b64_json": b64, "created_at": int(time.time()),
                             "size": size, "quality": "auto", "background": "opaque", "output_format": output_format}
    if stage == "partial_image":
        event["partial_image_index"] = index
    else:
        event["usage"] = NO_USAGE
    return event


def partial_every(steps: int, partial_images: int) -> int:
    """Steps between previews so that `partial_images` come before the image (0: none)."""
    return 0 if not partial_images else max(1, steps // (partial_images + 1))
