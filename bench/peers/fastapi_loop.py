"""The bare loop users write first: FastAPI, one global pipeline behind a lock, one image per request."""

from __future__ import annotations

import threading

import uvicorn
from common import generate, load, settings
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel

model, threads, port, _, _ = settings()
pipe = load(model, threads)
lock = threading.Lock()
app = FastAPI()


class Body(BaseModel):
    prompt: str
    seed: int = 0
    steps: int = 20
    size: int = 64


@app.post("/generate")
def generate_one(body: Body) -> Response:  # a sync route: FastAPI runs it in its thread pool
    with lock:
        png = generate(pipe, [body.prompt], [body.seed], body.steps, body.size)[0]
    return Response(png, media_type="image/png")


@app.get("/health")
def health() -> dict:
    return {"ok": True}


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
