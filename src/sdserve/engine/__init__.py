"""The engine: model registry, samplers, and running a batch of requests. Knows nothing of HTTP or queues."""


def quiet_libraries() -> None:
    """Library progress bars and import warnings would interleave with sdserve's own logs and progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
