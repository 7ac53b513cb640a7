"""FastAPI dependencies: the app's service, injected rather than global."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from sdserve.api.security import caller_of
from sdserve.keys import Caller
from sdserve.schema import GenerationRequest
from sdserve.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def get_caller(request: Request) -> Caller:
    """Who is calling: the key or Basic user auth accepted, else (auth off) the client's address."""
    return caller_of(request.scope)


CallerDep = Annotated[Caller, Depends(get_caller)]


def build_request(**fields: object) -> GenerationRequest:
    """A GenerationRequest from a dialect's fields; a bad field is a 422 naming it, like a bad body."""
    try:
        return GenerationRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
