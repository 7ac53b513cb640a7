"""Ray Serve on its documented defaults, with @serve.batch(max_batch_size, batch_wait_timeout_s).

Ray opens listeners on every interface whatever it is told: the harness runs this inside a network namespace
that has only loopback (`unshare --net`)."""

from __future__ import annotations

import base64
import time

import ray
from common import generate, load, settings
from ray import serve
from starlette.requests import Request

model, threads, port, max_batch, timeout = settings()


@serve.deployment
class StableDiffusion:
    def __init__(self) -> None:
        self.pipe = load(model, threads)

    @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=timeout)
    async def handle(self, requests: list[dict]) -> list[dict]:
        first = requests[0]
        pngs = generate(self.pipe, [r["prompt"] for r in requests], [r.get("seed", 0) for r in requests],
                        first.get("steps", 20), first.get("size", 64))
        return [{"image": base64.b64encode(p).decode()} for p in pngs]

    async def __call__(self, request: Request) -> dict:
        return await self.handle(await request.json())


if __name__ == "__main__":
    # Defaults, but no dashboard: nobody looks at it here, and it would take CPU from the model.
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(StableDiffusion.bind(), route_prefix="/generate")
    while True:
        time.sleep(3600)
