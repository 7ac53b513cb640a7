"""FastAPI dependencies: the app's service, the caller, and the preferences any dialect's client may send as
headers, injected rather than global."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
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


# Cancel-After, as Replicate reads it: "90", "30s", "5m", "1h30m".
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")
MAX_WAIT_S = 600.0


@dataclass(frozen=True)
class Preferences:
    """What a client may ask in headers whatever its dialect's body allows: how long a synchronous call waits
    (`Prefer: wait=N`, RFC 7240), when its job is no longer wanted (`Cancel-After`), and where its events go
    (`Webhook-Url`, `Webhook-Events`). A field the body gives wins over its header."""

    wait_s: float | None = None
    cancel_after_s: float | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None

    def apply(self, request: GenerationRequest) -> GenerationRequest:
        given = {"cancel_after_s": self.cancel_after_s, "webhook_url": self.webhook_url,
                 "webhook_events": self.webhook_events}
        update = {k: v for k, v in given.items() if v is not None and k not in request.model_fields_set}
        if not update:
            return request
        try:
            return GenerationRequest.model_validate({**request.model_dump(exclude_unset=True), **update})
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None


def _duration(text: str) -> float | None:
    match = _DURATION.match(text.strip().lower())
    if not match or not any(match.groups()):
        return None
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def get_preferences(request: Request) -> Preferences:
    headers = request.headers
    wait = None
    for token in headers.get("prefer", "").split(","):
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "wait":
            try:  # a preference the server cannot read is ignored (RFC 7240)
                wait = min(MAX_WAIT_S, max(1.0, float(value.strip().strip('"'))))
            except ValueError:
                wait = None
    cancel_after = None
    if "cancel-after" in headers:  # its range is the request field's (cancel_after_s): a 422 naming it
        cancel_after = _duration(headers["cancel-after"])
        if cancel_after is None:
            raise HTTPException(400, "Cancel-After must be a duration: 90, 30s, 5m or 1h30m")
    events: Any = headers.get("webhook-events")
    if events is not None:
        events = [e.strip() for e in events.split(",") if e.strip()]
    return Preferences(wait, cancel_after, headers.get("webhook-url"), events)


PreferencesDep = Annotated[Preferences, Depends(get_preferences)]
