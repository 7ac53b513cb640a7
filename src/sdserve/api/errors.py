"""Errors as JSON a person can act on, with the right status code. Never a 500 for client input.

Each dialect's shape is one function here (`*_error`); `shape_for` maps a URL to it. OpenAI clients get
`{"error": {message, type, param, code}}`, A1111 clients `{"error", "detail", "errors"}`, TF Serving and Open
Inference Protocol v2 clients `{"error": message}`, everyone else `{"detail", "errors": [{field, message}]}`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdserve.core import ContentBlocked, ModelUnavailable, NotDoneYet, RequestRejected
from sdserve.jobs.queue import (
    IdempotencyConflict,
    JobFinished,
    JobNotFound,
    NotAccepting,
    QueueFull,
    StorageError,
)
from sdserve.protocols.openai import OpenAIError, error_body
from sdserve.protocols.tensors import TensorProtocolError
from sdserve.ratelimit import RateLimited
from sdserve.schema import without_reprs

log = logging.getLogger(__name__)

_OPENAI_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
                 503: "server_error", 500: "server_error"}


def _tensor_protocol(path: str) -> bool:
    """TF Serving (/v1/models/{name}…; the bare /v1/models is OpenAI's) and the v2 protocol."""
    return path.startswith(("/v1/models/", "/v2/")) or path == "/v2"


# ----- each dialect's error shape ------------------------------------------------------------------
# Each takes the same arguments: (status, message, field, errors, error_type, code) -> (status, body).
def tensor_error(status: int, message: str, field: str | None = None, errors: list[dict] | None = None,
                 error_type: str | None = None, code: str | None = None) -> tuple[int, dict[str, Any]]:
    """TF Serving and the v2 protocol answer invalid input with 400 and a bare message."""
    return (400 if status == 422 else status), {"error": message}


def openai_error(status: int, message: str, field: str | None = None, errors: list[dict] | None = None,
                 error_type: str | None = None, code: str | None = None) -> tuple[int, dict[str, Any]]:
    """OpenAI answers invalid input with 400, never 422, as {"error": {message, type, param, code}}."""
    status = 400 if status == 422 else status
    return status, error_body(message, error_type or _OPENAI_TYPES.get(status, "invalid_request_error"), field, code)


def a1111_error(status: int, message: str, field: str | None = None, errors: list[dict] | None = None,
                error_type: str | None = None, code: str | None = None) -> tuple[int, dict[str, Any]]:
    return status, {"error": error_type or "HTTPException", "detail": message, "body": None, "errors": message}


def native_error(status: int, message: str, field: str | None = None, errors: list[dict] | None = None,
                 error_type: str | None = None, code: str | None = None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"detail": message}
    if code is not None:
        body["code"] = code
    if errors is not None or field is not None:
        body["errors"] = errors if errors is not None else [{"field": field, "message": message}]
    return status, body


Shape = Callable[..., tuple[int, dict[str, Any]]]


def shape_for(path: str) -> Shape:
    """The one place a URL says which dialect's error shape its client reads (middleware errors come before
    any route, so they know only the path)."""
    if _tensor_protocol(path):
        return tensor_error
    if path.startswith("/v1/"):
        return openai_error
    if path.startswith("/sdapi/"):
        return a1111_error
    return native_error


def respond(shape: Shape, status: int, message: str, *, field: str | None = None, errors: list[dict] | None = None,
            headers: dict[str, str] | None = None, error_type: str | None = None,
            code: str | None = None) -> JSONResponse:
    """An error in `shape`, its message cleaned of Python reprs."""
    message = without_reprs(message)
    if errors is not None:
        errors = [{**e, "message": without_reprs(str(e.get("message", "")))} for e in errors]
    status, body = shape(status, message, field, errors, error_type, code)
    return JSONResponse(body, status_code=status, headers=headers)


def render(path: str, status: int, message: str, **kwargs: Any) -> JSONResponse:
    """An error in the shape of the dialect `path` belongs to."""
    return respond(shape_for(path), status, message, **kwargs)


def _field(loc: tuple) -> str:
    # ("body", "width") -> "width"; ("query", "steps") -> "steps"
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation(request: Request, raw_errors: list[dict]) -> JSONResponse:
    errors = [{"field": _field(tuple(e.get("loc", ()))), "message": e.get("msg", "invalid"), "type": e.get("type")}
              for e in raw_errors]
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return render(request.url.path, 422, message, field=errors[0]["field"] if errors else None, errors=errors)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation(request, list(exc.errors()))

    @app.exception_handler(ValidationError)
    async def _model_validation(request: Request, exc: ValidationError) -> JSONResponse:
        # A dialect built a canonical request out of bounds: still the client's input.
        return _validation(request, exc.errors())

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return render(request.url.path, 422, str(exc), field=exc.field,
                      errors=[{"field": exc.field, "message": str(exc)}] if exc.field else [])

    @app.exception_handler(NotDoneYet)
    async def _not_done(request: Request, exc: NotDoneYet) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "job_ids": exc.job_ids}, status_code=202, headers={
            "Location": f"/api/v1/jobs/{exc.job_ids[0]}", "Preference-Applied": f"wait={exc.wait_s:g}"})

    @app.exception_handler(ModelUnavailable)
    async def _model_unavailable(request: Request, exc: ModelUnavailable) -> JSONResponse:
        if exc.named:
            return render(request.url.path, 404, str(exc), field="model")
        return render(request.url.path, 503, str(exc), headers={"Retry-After": "30"})

    @app.exception_handler(ContentBlocked)
    async def _blocked(request: Request, exc: ContentBlocked) -> JSONResponse:
        return render(request.url.path, 400, str(exc), field=exc.field, code="content_policy_violation",
                      error_type="content_policy_violation" if request.url.path.startswith("/sdapi/") else None,
                      errors=[{"field": exc.field, "message": str(exc)}] if exc.field else [])

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        return respond(openai_error, exc.status, str(exc), field=exc.param, error_type=exc.type, code=exc.code)

    @app.exception_handler(TensorProtocolError)
    async def _tensor(request: Request, exc: TensorProtocolError) -> JSONResponse:
        return render(request.url.path, exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return render(request.url.path, 429, f"{exc}; retry in {exc.retry_after_s} s",
                      headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RateLimited)
    async def _rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        return render(request.url.path, 429, str(exc), headers=exc.decision.headers(), code="rate_limit_exceeded")

    @app.exception_handler(NotAccepting)
    async def _not_accepting(request: Request, exc: NotAccepting) -> JSONResponse:
        return render(request.url.path, 503, str(exc), headers={"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        # 507 Insufficient Storage when the disk is full; 503 for other write failures. Either may pass.
        return render(request.url.path, 507 if exc.full else 503, str(exc), headers={"Retry-After": "30"},
                      error_type="server_error")

    @app.exception_handler(JobNotFound)
    async def _not_found(request: Request, exc: JobNotFound) -> JSONResponse:
        return render(request.url.path, 404, str(exc))

    @app.exception_handler(IdempotencyConflict)
    async def _conflict(request: Request, exc: IdempotencyConflict) -> JSONResponse:
        return render(request.url.path, 409, str(exc))

    @app.exception_handler(JobFinished)
    async def _finished(request: Request, exc: JobFinished) -> JSONResponse:
        return render(request.url.path, 409, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"nothing at {request.url.path}"
        return render(request.url.path, exc.status_code, detail, headers=getattr(exc, "headers", None))



# ----- the error bodies, as /openapi.json declares them ----------------------------------------------
_FIELD_ERROR = {"type": "object", "required": ["field", "message"], "properties": {
    "field": {"type": ["string", "null"]}, "message": {"type": "string"}, "type": {"type": ["string", "null"]}}}
ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {"title": "Error", "type": "object", "required": ["detail"], "properties": {
        "detail": {"type": "string", "description": "What went wrong, and what to do about it."},
        "errors": {"type": "array", "items": _FIELD_ERROR}}},
    "A1111Error": {"title": "A1111Error", "type": "object", "required": ["error", "detail"], "properties": {
        "error": {"type": "string"}, "detail": {"type": "string"}, "body": {}, "errors": {"type": "string"}}},
    "TensorError": {"title": "TensorError", "type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"}}},
    "OpenAIError": {"title": "OpenAIError", "type": "object", "required": ["error"], "properties": {
        "error": {"type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
}


def _dialect_error(path: str) -> tuple[str, str]:
    """(status for invalid input, schema name) as `render` answers on this path."""
    if _tensor_protocol(path):
        return "400", "TensorError"
    if path.startswith("/v1/"):
        return "400", "OpenAIError"
    if path.startswith("/sdapi/"):
        return "422", "A1111Error"
    return "422", "Error"


def document(app: FastAPI) -> None:
    """Make /openapi.json declare the error bodies `render` really sends, in place of FastAPI's
    HTTPValidationError (which no route here returns)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        components.update(ERROR_SCHEMAS)
        for path, operations in schema.get("paths", {}).items():
            status, name = _dialect_error(path)
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses or operation.get("parameters") or operation.get("requestBody"):
                    responses.pop("422", None)
                    responses[status] = {"description": "Invalid input: the message names the field",
                                         "content": {"application/json": {"schema": {
                                             "$ref": f"#/components/schemas/{name}"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

