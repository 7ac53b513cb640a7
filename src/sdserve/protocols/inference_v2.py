"""The Open Inference Protocol (KServe v2, Triton's HTTP API), REST with the binary tensor data extension.

Infer: `POST /v2/models/{name}/infer` with `{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [N],
"data": [...]}, ...]}`. Each prompt is one image. The other inputs are native request fields (`seed`,
`steps`, `cfg_scale`, `width`, … as in `tensors.INPUTS`): one value for all prompts, or one per prompt. A
request's `parameters` may set the same fields for all prompts. Outputs: `image` (BYTES: a base64 PNG in
JSON, the PNG's bytes in binary) and `seed` (INT64), shape [N].

Binary extension (what Triton's clients send by default): the body is the JSON header, whose length is the
`Inference-Header-Content-Length` header, then each binary input's bytes in order; an input with
`parameters.binary_data_size` takes its data from there. BYTES elements are a 4-byte little-endian length
and the bytes. Errors are `{"error": "message"}`.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from sdserve.protocols.tensors import INPUTS, OUTPUTS, VERSION, TensorProtocolError

DATATYPES = {"text": "BYTES", "int": "INT64", "float": "FP32"}
NUMERIC = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
           "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
INTEGER = {name for name in NUMERIC if "INT" in name}
ACCEPTS = {"text": {"BYTES"}, "int": INTEGER, "float": INTEGER | {"FP16", "FP32", "FP64"}}
# Request parameters Triton's clients set themselves; they say nothing about the image.
# (Triton's `priority` is theirs: 1 is the highest. sdserve's priority goes as an input tensor.)
CLIENT_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout", "sequence_id", "sequence_start",
                               "sequence_end"})
# Request parameters that set a native field for every prompt.
PARAMETER_FIELDS = frozenset(INPUTS) - {"prompt", "priority"}


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass
class Reply:
    """What the response carries: each output's name and whether it goes as binary data."""

    request_id: str | None
    outputs: list[tuple[str, bool]]


def tensor_metadata(table: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "datatype": DATATYPES[kind], "shape": [-1]} for name, kind in table.items()]


def model_metadata(name: str) -> dict[str, Any]:
    return {"name": name, "versions": [VERSION], "platform": "sdserve",
            "inputs": tensor_metadata(INPUTS), "outputs": tensor_metadata(OUTPUTS)}


# ----- request -----------------------------------------------------------------------------------
def deserialize_bytes(buffer: bytes) -> list[bytes]:
    """BYTES elements in the binary format: each a uint32 little-endian length, then that many bytes."""
    items, offset = [], 0
    while offset < len(buffer):
        if offset + 4 > len(buffer):
            raise ValueError("a BYTES element's length is cut off")
        (size,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + size > len(buffer):
            raise ValueError("a BYTES element is shorter than its length says")
        items.append(buffer[offset:offset + size])
        offset += size
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major elements of nested lists (JSON nesting is bounded by the app's depth check)."""
    return [x for item in data for x in (_flatten(item) if isinstance(item, list) else [item])]


def _values(tensor: RequestInput, binary: bytes | None) -> list[Any]:
    """The tensor's elements as Python values, from JSON data or from its binary data."""
    datatype = tensor.datatype.upper()
    if binary is not None:
        if datatype == "BYTES":
            values: list[Any] = deserialize_bytes(binary)
        elif datatype in NUMERIC:
            dtype = np.dtype(NUMERIC[datatype])
            if len(binary) % dtype.itemsize:
                raise ValueError(f"{len(binary)} bytes is not a whole number of {datatype} elements")
            values = np.frombuffer(binary, dtype=dtype).tolist()
        else:
            raise ValueError(f"datatype {tensor.datatype} is not supported")
    elif tensor.data is None:
        raise ValueError("has neither data nor binary_data_size")
    else:
        values = _flatten(tensor.data)
    expected = int(np.prod(tensor.shape)) if tensor.shape else 1
    if any(dim < 0 for dim in tensor.shape) or len(values) != expected:
        raise ValueError(f"shape {tensor.shape} does not match its {len(values)} elements")
    return values


def _typed(name: str, value: Any) -> Any:
    """A value as the native field's kind; BYTES arrive as bytes in binary and as str in JSON."""
    kind = INPUTS[name]
    if kind == "text":
        if isinstance(value, bytes):
            try:
                return value.decode()
            except UnicodeDecodeError:
                raise TensorProtocolError(f"input {name}: not UTF-8 text") from None
        if not isinstance(value, str):
            raise TensorProtocolError(f"input {name}: expected text, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TensorProtocolError(f"input {name}: expected a number, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise TensorProtocolError(f"input {name}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) per the Inference-Header-Content-Length header."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise TensorProtocolError("Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise TensorProtocolError(f"Inference-Header-Content-Length {length} is outside the {len(body)}-byte body")
    return body[:length], body[length:]


def parse_infer(header: bytes, tail: bytes, max_prompts: int) -> tuple[list[dict[str, Any]], Reply]:
    """The request as native request fields, one dict per prompt, and what the reply must carry."""
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise TensorProtocolError(f"not an inference request: {where}: {first.get('msg')}") from None
    parameters = dict(request.parameters or {})
    unknown = set(parameters) - PARAMETER_FIELDS - CLIENT_PARAMETERS
    if unknown:
        raise TensorProtocolError(f"unknown parameters {sorted(unknown)}; known: {sorted(PARAMETER_FIELDS)}")
    columns: dict[str, list[Any]] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name not in INPUTS:
            raise TensorProtocolError(f"unknown input {tensor.name!r}; inputs: {', '.join(INPUTS)}")
        if tensor.name in columns:
            raise TensorProtocolError(f"input {tensor.name!r} is given twice")
        kind = INPUTS[tensor.name]
        if tensor.datatype.upper() not in ACCEPTS[kind]:
            raise TensorProtocolError(f"input {tensor.name}: datatype {tensor.datatype} is not one of "
                                 f"{', '.join(sorted(ACCEPTS[kind]))}")
        binary = None
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise TensorProtocolError(f"input {tensor.name}: binary_data_size {size} is past the body's binary data")
            binary, offset = tail[offset:offset + size], offset + size
        try:
            columns[tensor.name] = _values(tensor, binary)
        except ValueError as exc:
            raise TensorProtocolError(f"input {tensor.name}: {exc}") from None
    if offset != len(tail):
        raise TensorProtocolError(f"{len(tail) - offset} bytes of binary data belong to no input")
    if "prompt" not in columns:
        raise TensorProtocolError("the prompt input is required: BYTES, one element per image")
    count = len(columns["prompt"])
    if not 1 <= count <= max_prompts:
        raise TensorProtocolError(f"{count} prompts: send 1 to {max_prompts} per request on this server")
    shared = {name: _typed(name, value) for name, value in parameters.items() if name in PARAMETER_FIELDS}
    rows: list[dict[str, Any]] = [dict(shared) for _ in range(count)]
    for name, values in columns.items():
        if len(values) not in (1, count):
            raise TensorProtocolError(f"input {name} has {len(values)} elements for {count} prompts: send 1 or {count}")
        for i, row in enumerate(rows):
            row[name] = _typed(name, values[i if len(values) == count else 0])
    return rows, _reply(request, parameters)


def _reply(request: InferenceRequest, parameters: dict[str, Any]) -> Reply:
    all_binary = parameters.get("binary_data_output") is True
    if request.outputs is None:
        return Reply(request.id, [(name, all_binary) for name in OUTPUTS])
    outputs = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise TensorProtocolError(f"unknown output {output.name!r}; outputs: {', '.join(OUTPUTS)}")
        outputs.append((output.name, all_binary or (output.parameters or {}).get("binary_data") is True))
    return Reply(request.id, outputs)


# ----- response ----------------------------------------------------------------------------------
def encode_response(model: str, reply: Reply, images: list[tuple[bytes, int]]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    tensors, blobs = [], []
    for name, binary in reply.outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": DATATYPES[OUTPUTS[name]], "shape": [len(images)]}
        if name == "image":
            pngs = [png for png, _ in images]
            blob = serialize_bytes(pngs) if binary else None
            data: list[Any] = [base64.b64encode(png).decode() for png in pngs]
        else:
            seeds = [seed for _, seed in images]
            blob = np.asarray(seeds, dtype="<i8").tobytes() if binary else None
            data = seeds
        if blob is None:
            tensor["data"] = data
        else:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": tensors}
    if reply.request_id is not None:
        body["id"] = reply.request_id
    header = json.dumps(body).encode()
    return header + b"".join(blobs), len(header) if blobs else None
