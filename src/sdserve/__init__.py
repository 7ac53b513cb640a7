"""sdserve: a self-hosted Stable Diffusion server."""

__version__ = "0.1.0"
