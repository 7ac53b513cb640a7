"""The native request fields that tensor protocols (TF Serving, Open Inference Protocol v2) carry as named
inputs, each with its kind. One table, so both protocols declare and accept the same inputs."""

from __future__ import annotations

from typing import Literal

Kind = Literal["text", "int", "float"]

# sdserve has no model versions: to these protocols every model is version 1.
VERSION = "1"

# name -> kind. `prompt` is required; the rest take the native defaults when left out.
INPUTS: dict[str, Kind] = {
    "prompt": "text",
    "negative_prompt": "text",
    "seed": "int",
    "steps": "int",
    "cfg_scale": "float",
    "width": "int",
    "height": "int",
    "sampler": "text",
    "scheduler": "text",
    "init_image": "text",  # base64 or data URL, as in the native API
    "mask": "text",
    "strength": "float",
    "priority": "int",
    "timeout_s": "float",
}

# The outputs: one PNG and its seed per prompt.
OUTPUTS: dict[str, Kind] = {"image": "text", "seed": "int"}


class TensorProtocolError(ValueError):
    """Both protocols answer errors as `{"error": message}` with the status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
