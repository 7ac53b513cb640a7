"""LitServe on its documented defaults, with dynamic batching (max_batch_size, batch_timeout) turned on."""

from __future__ import annotations

import base64

import litserve as ls
from common import generate, load, settings

model, threads, port, max_batch, timeout = settings()


class StableDiffusionAPI(ls.LitAPI):
    def setup(self, device):
        self.pipe = load(model, threads)

    def decode_request(self, request):
        return request

    def predict(self, batch):  # batched: a list of decoded requests
        first = batch[0]
        return generate(self.pipe, [r["prompt"] for r in batch], [r.get("seed", 0) for r in batch],
                        first.get("steps", 20), first.get("size", 64))

    def encode_response(self, png):
        return {"image": base64.b64encode(png).decode()}


if __name__ == "__main__":
    server = ls.LitServer(StableDiffusionAPI(max_batch_size=max_batch, batch_timeout=timeout), accelerator="cpu")
    server.run(host="127.0.0.1", port=port, generate_client_file=False, log_level="warning")
