"""The engine: model registry, samplers, and running a batch of requests. Knows nothing of HTTP or queues."""


def quiet_libraries() -> None:
    """Library progress bars and import warnings would interleave with sdserve's own logs and progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def preload() -> None:
    """Import what an engine process needs before its first job (torch, diffusers' pipelines: most of a worker's
    start), so that processes forked from this one start in the time of a model load."""
    import torch  # noqa: F401
    from diffusers import (  # noqa: F401
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    import sdserve.engine.models  # noqa: F401
    import sdserve.engine.pipeline  # noqa: F401
    import sdserve.jobs.runner  # noqa: F401
    import sdserve.service  # noqa: F401
    from sdserve.engine import accel

    if accel.auto_options("cpu"):  # OpenVINO, the CPU's default engine (importing it starts no thread)
        accel.import_openvino()
