"""create_app(settings, service): the one FastAPI app serving every dialect, the UI and operations routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from sdserve import __version__, webhooks
from sdserve.api import a1111, controlnet, errors, inference_v2, native, openai, ops, sagemaker, simple, tfserving
from sdserve.api.metrics import Metrics
from sdserve.api.middleware import (
    BodyLimitMiddleware,
    InternalErrorMiddleware,
    JSONGuardMiddleware,
    MetricsMiddleware,
    SecurityHeadersMiddleware,
)
from sdserve.api.security import AuthMiddleware, RateLimitMiddleware, parse_users
from sdserve.api.urls import HostGuard, ImageLinks, allowed_hosts
from sdserve.config import Settings
from sdserve.jobs.queue import StorageError
from sdserve.keys import KeyBook
from sdserve.service import Service

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def _metrics(service: Service) -> Metrics:
    def measured(read: Callable[[], int]) -> Callable[[], float]:
        def value() -> float:  # a scrape while the queue is unreachable says "unknown", not 500
            try:
                return read()
            except StorageError:
                return float("nan")
        return value

    metrics = Metrics(queue_depth=measured(service.depth), live_workers=measured(service.live_workers))
    service.observe(metrics.on_event)
    return metrics


def create_ops_app(service: Service) -> FastAPI:
    """A worker's probe port: /healthz, /readyz (model loaded, queue reachable, writes working), /metrics.
    The caller owns the service's lifecycle."""
    app = FastAPI(title="sdserve worker", version=__version__, openapi_url=None)
    app.state.service = service
    app.state.metrics = _metrics(service)
    app.include_router(ops.router)
    return app


def create_app(settings: Settings, service: Service) -> FastAPI:
    metrics = _metrics(service)

    keys = KeyBook(settings.api_keys, settings.keys_file)
    # Webhook deliveries, from every API process that can sign them (the outbox is the job store's): with the
    # key's own secret, else the server's. A replica with neither leaves them to those that have one.
    dispatcher = None
    if settings.webhook_secret or settings.keys_file:
        dispatcher = webhooks.Dispatcher(service.queue,
                                         lambda owner: keys.webhook_secret(owner) or settings.webhook_secret,
                                         settings.webhook_allow_hosts,
                                         lambda event, result: metrics.webhooks.labels(event, result).inc())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        if dispatcher is not None:
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                await asyncio.to_thread(dispatcher.stop)
            await asyncio.to_thread(service.shutdown)

    app = FastAPI(
        title="sdserve",
        version=__version__,
        summary="Stable Diffusion server: one queue for the native, A1111, OpenAI, SageMaker, TF Serving, "
                "Open Inference Protocol v2 and simple APIs.",
        lifespan=lifespan,
        # No redirect from `/path/` to `/path`: Starlette builds it from the Host header, which is not trusted
        # when --public-url is set (any Host is answered then).
        redirect_slashes=False,
    )
    app.state.service = service
    app.state.metrics = metrics
    app.state.keys = keys
    metrics.keys_file_problem.set_function(lambda: 1.0 if keys.check() else 0.0)
    app.state.links = links = ImageLinks.for_settings(settings, service.shared)
    app.state.a1111 = a1111.A1111State(service.shared)
    errors.install(app)
    errors.document(app)
    for module in (ops, native, a1111, controlnet, openai, tfserving, inference_v2, sagemaker, simple):
        app.include_router(module.router)
    # The web UI: static files from the package, no build step, no CDN.
    app.mount("/ui", StaticFiles(directory=WEB_DIR), name="ui")

    # Outermost last: metrics see every response, 401s and 413s included; the body is read whole before
    # auth answers (so a 401 leaves the connection reusable), and parsed for the JSON checks only after it.
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(JSONGuardMiddleware)
    app.add_middleware(RateLimitMiddleware, limiter=service.limiter)  # inside auth: it knows the caller
    app.add_middleware(AuthMiddleware, keys=keys, users=parse_users(settings.api_auth), signed=links.signed_image)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_mb * 2**20)
    app.add_middleware(HostGuard, allowed=allowed_hosts(settings))  # a forged Host: 400 before anything else
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
