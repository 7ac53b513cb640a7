"""TensorFlow Serving's REST API (tensorflow.org/tfx/serving/api_rest), as seed 002's GKE cluster served it.

Status: `GET /v1/models/{name}` → `{"model_version_status": [{version, state, status}]}`.
Predict: `POST /v1/models/{name}:predict` with the row format `{"instances": [...]}` or the columnar
format `{"inputs": ...}`. Each instance is one image: a prompt string, or an object with the native
request's fields (`prompt`, `negative_prompt`, `seed`, `steps`, `cfg_scale`, `width`, `height`, `sampler`…).
Row answers `{"predictions": [{"image": base64 PNG, "seed": int}]}`, columnar `{"outputs": {"image": [...],
"seed": [...]}}`. Errors are `{"error": "message"}`.
"""

from __future__ import annotations

from typing import Any

from sdserve.protocols.tensors import INPUTS, OUTPUTS, VERSION, TensorProtocolError

# Fields an instance may not set: the model comes from the URL, and an instance is one image.
NOT_PER_INSTANCE = frozenset({"model", "n"})


def model_status() -> dict[str, Any]:
    """GetModelStatus for a model that can serve (sdserve loads it on the first request if it is not yet)."""
    return {"model_version_status": [{"version": VERSION, "state": "AVAILABLE",
                                      "status": {"error_code": "OK", "error_message": ""}}]}


_DTYPES = {"text": "DT_STRING", "int": "DT_INT64", "float": "DT_FLOAT"}


def signature() -> dict[str, Any]:
    """The predict SignatureDef: one entry per input field, a batch dimension on each."""
    def tensors(table: dict[str, str]) -> dict[str, Any]:
        return {name: {"name": name, "dtype": _DTYPES[kind], "tensor_shape": {"dim": [{"size": "-1"}]}}
                for name, kind in table.items()}

    return {"method_name": "tensorflow/serving/predict", "inputs": tensors(INPUTS), "outputs": tensors(OUTPUTS)}


def _instance(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"prompt": value}
    if not isinstance(value, dict):
        raise TensorProtocolError(f"{where} must be a prompt string or an object with a prompt")
    if "prompt" not in value:
        raise TensorProtocolError(f"{where} has no prompt")
    banned = NOT_PER_INSTANCE & value.keys()
    if banned:
        raise TensorProtocolError(f"{where}: {', '.join(sorted(banned))} cannot be set per instance "
                             "(the model is the one in the URL, and each instance is one image)")
    return value


def parse_predict(body: Any, max_instances: int) -> tuple[list[dict[str, Any]], bool]:
    """The instances as native request fields, and whether the request used the columnar format."""
    if not isinstance(body, dict):
        raise TensorProtocolError("the body must be a JSON object with instances or inputs")
    if ("instances" in body) == ("inputs" in body):
        raise TensorProtocolError("the body needs exactly one of instances (row format) or inputs (columnar format)")
    columnar = "inputs" in body
    if not columnar:
        raw = body["instances"]
        if not isinstance(raw, list):
            raise TensorProtocolError("instances must be a list")
        rows = [_instance(item, f"instances[{i}]") for i, item in enumerate(raw)]
    else:
        rows = _columns(body["inputs"])
    if not rows:
        raise TensorProtocolError("no instances: send at least one prompt")
    if len(rows) > max_instances:
        raise TensorProtocolError(f"{len(rows)} instances is over this server's limit of {max_instances} per request")
    return rows, columnar


def _columns(inputs: Any) -> list[dict[str, Any]]:
    """Columnar inputs: a prompt, a list of prompts, or named lists of equal length (a scalar applies to all)."""
    if isinstance(inputs, (str, list)):
        inputs = {"prompt": inputs}
    if not isinstance(inputs, dict) or "prompt" not in inputs:
        raise TensorProtocolError("inputs must be a prompt, a list of prompts, or an object with a prompt list")
    prompts = inputs["prompt"] if isinstance(inputs["prompt"], list) else [inputs["prompt"]]
    rows: list[dict[str, Any]] = [{} for _ in prompts]
    for name, column in inputs.items():
        values = column if isinstance(column, list) else [column] * len(prompts)
        if len(values) != len(prompts):
            raise TensorProtocolError(f"inputs.{name} has {len(values)} values for {len(prompts)} prompts")
        for row, value in zip(rows, values):
            row[name] = value
    return [_instance(row, f"inputs[{i}]") for i, row in enumerate(rows)]


def predictions(images: list[tuple[str, int]], columnar: bool) -> dict[str, Any]:
    """(base64 PNG, seed) per instance, in the request's format."""
    if columnar:
        return {"outputs": {"image": [b64 for b64, _ in images], "seed": [seed for _, seed in images]}}
    return {"predictions": [{"image": b64, "seed": seed} for b64, seed in images]}
