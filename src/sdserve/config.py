"""Settings shared by every entry point. Each field reads `SDSERVE_<NAME>` from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sdserve import bounds

Device = Literal["auto", "cpu", "cuda", "mps"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 7860
    # First entry is the default model. "demo" is the embedded model built on first use.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["demo"])
    models_dir: Path = Path("models")
    data_dir: Path = Path("data")
    device: Device = "auto"
    allow_pickle: bool = False
    max_loaded_models: int = Field(1, ge=1)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A1111's --api-auth: HTTP Basic users, "user:pass" entries.
    api_auth: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # SageMaker mode: bind $SAGEMAKER_BIND_TO_PORT (else 8080) on all interfaces, model from /opt/ml/model.
    sagemaker: bool = False

    # Queue and runner
    max_queue: int = Field(256, ge=1, description="Queued jobs before submissions get 429.")
    job_timeout_s: float | None = Field(600.0, gt=0, description="Default per-job limit, waiting plus running.")
    shutdown_grace_s: float = Field(25.0, ge=0, description="On SIGTERM, time to finish the running batch.")
    max_batch: int | None = Field(None, ge=1, le=64, description="Images per UNet pass; default by device.")
    batch_wait_ms: float = Field(20.0, ge=0, le=5000, description="How long a batch waits for companions.")
    # Step previews: every this many steps a job's watchers get the forming picture (0: only jobs that ask, by
    # their own preview_every; A1111 calls follow its show_progress_every_n_steps option).
    preview_every: int = Field(0, ge=0, le=bounds.MAX_STEPS, description="Default steps between previews; 0: none.")
    # Webhooks (webhooks.py): the Standard Webhooks signing secret (whsec_ and the base64 of 16+ random bytes)
    # for jobs whose key has none of its own; and hosts a delivery may reach although they resolve to a private,
    # loopback or link-local address (by default none may).
    webhook_secret: str | None = None
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Speed-ups (engine/accel.py OPTIMIZATIONS): empty is `auto`, the fastest gated path for the device; `none` is
    # plain torch.
    optimize: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Compiled graphs (OpenVINO IR and blobs), keyed by model hash: default <data dir>/compiled. Share it between
    # replicas or keep it on a volume, and a restart skips the tracing.
    compile_cache: Path | None = None
    engine: Literal["diffusers", "noop"] = Field("diffusers", description="noop: no generation, for benchmarks.")
    noop_step_ms: float = Field(0.0, ge=0, le=10000, description="noop engine: how long each step takes.")

    # The job queue: sqlite:///path (default: <data dir>/jobs.db) or redis://host:port/db (shared by processes)
    queue: str | None = None
    # Redis key prefix: deployments sharing one Redis keep apart. KEDA's trigger reads the stream <prefix>demand.
    queue_prefix: str = Field("sdserve:", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9:_.-]+$")
    lease_s: float = Field(30.0, ge=1, le=3600, description="How long a silent worker keeps its jobs.")
    # sdserve serve: engine processes (0: one per visible GPU, else one), each pinned to its own GPU.
    workers: int = Field(0, ge=0, le=64, description="sdserve serve: engine processes; 0: one per GPU, one on CPU.")
    name: str | None = Field(None, description="This worker's name in job records; default hostname-pid.")
    metrics_port: int | None = Field(None, ge=1, le=65535, description="sdserve worker: probe and metrics port.")
    # Where images live: file:///path (default: <data dir>/images) or s3://bucket/prefix?endpoint_url=&region=
    storage: str | None = None
    image_url_ttl_s: int = Field(3600, ge=1, le=7 * 86400, description="Lifetime of presigned image URLs.")
    # GET /api/v1/images/{id} on a store with presigned URLs: redirect to one, or proxy the bytes.
    image_route: Literal["redirect", "proxy"] = "redirect"

    # A synchronous call whose client disconnects: its queued jobs are canceled; running ones finish or are canceled.
    on_disconnect: Literal["finish", "cancel"] = "finish"

    # Rate limits per caller (API key, Basic user, or client address with auth off); off when unset.
    rate_limit: str | None = Field(None, description="Submissions per caller, e.g. 5/s, 300/min.")
    rate_burst: float | None = Field(None, gt=0, description="Submissions a caller may make at once.")
    images_per_minute: float | None = Field(None, gt=0, description="Images per caller per minute (n=8 is 8).")
    # Keys with labels, their own limits, priorities and fair-share weights (TOML or YAML; keys.py).
    keys_file: Path | None = None

    # Moderation: every finished image is checked before it is visible (moderation.py); prompts at submission.
    moderation: str = Field("none", description="none | safety-checker | http(s)://hook")
    safety_checker: Path | None = Field(None, description="Folder of diffusers' StableDiffusionSafetyChecker "
                                        "weights (with its feature_extractor), for --moderation safety-checker.")
    moderation_timeout_s: float = Field(10.0, gt=0, le=300, description="How long the HTTP hook may take.")
    blocklist: Path | None = Field(None, description="Words and phrases a prompt may not contain, one per line.")

    # Retention: ended jobs and images older than this are deleted (0 keeps them forever).
    keep_jobs_days: float = Field(30.0, ge=0)
    keep_images_days: float = Field(30.0, ge=0)
    prune_interval_s: float = Field(300.0, gt=0, description="How often the prune loop runs.")

    # Absolute URLs (OpenAI's `url`) start with this when set; else with the request's Host, honoured only when it is
    # in allowed_hosts (default: loopback, the bind address and this machine's names; "*" trusts any).
    public_url: str | None = Field(None, pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Signs the image URLs that leave the server (default: a random secret kept in the queue's shared state).
    url_secret: str | None = Field(None, min_length=16)

    # Bounds on requests (they can tighten the built-in ones, not loosen them)
    max_size: int = Field(bounds.MAX_SIZE, ge=bounds.MIN_SIZE, le=bounds.MAX_SIZE)
    max_steps: int = Field(bounds.MAX_STEPS, ge=1, le=bounds.MAX_STEPS)
    max_images: int = Field(bounds.MAX_IMAGES, ge=1, le=bounds.MAX_IMAGES)
    max_body_mb: int = Field(20, ge=1)
    # One request's work, in megapixel-steps (images × width × height × steps / 1e6, the hires pass included). Default
    # by device class (bounds.DEFAULT_MAX_WORK): what that class finishes within the job timeout.
    max_work: float | None = Field(None, gt=0, le=100_000)

    @field_validator("moderation")
    @classmethod
    def _moderation(cls, value: str) -> str:
        if value not in ("none", "safety-checker") and not value.startswith(("http://", "https://")):
            raise ValueError("use none, safety-checker, or the URL of an HTTP hook (http://… or https://…)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: str | None) -> str | None:
        if value:
            from sdserve.webhooks import check_secret

            check_secret(value)
        return value or None

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            from sdserve.ratelimit import Rate

            Rate.parse(value)  # a clear error at startup, not at the first request
        return value

    @field_validator("models", "api_keys", "api_auth", "optimize", "allowed_hosts", "webhook_allow_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object, info: ValidationInfo) -> object:
        # SDSERVE_API_KEYS="k1,k2" is friendlier than a JSON list in a shell or a Helm value. Names (never secrets
        # or paths) are split in a flag's values too: `--allowed-hosts a,b` is the flag given twice.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")] if value.strip() else []
        if isinstance(value, list) and info.field_name in ("optimize", "allowed_hosts", "webhook_allow_hosts"):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("api_keys", "api_auth")
    @classmethod
    def _no_empty_secret(cls, value: list[str]) -> list[str]:
        # `--api-key "$UNSET"` or SDSERVE_API_KEYS="k1,$UNSET" must not turn auth off (or leave a key out)
        # silently: refuse to start. (SDSERVE_API_KEYS unset or empty as a whole means no keys.)
        if any(not entry.strip() for entry in value):
            raise ValueError("an entry is empty (an unset variable?); refusing to start without the key it was "
                             "meant to set")
        return [entry.strip() for entry in value]

    @field_validator("public_url", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("models", "optimize", "allowed_hosts", "webhook_allow_hosts")
    @classmethod
    def _drop_empty(cls, value: list[str]) -> list[str]:
        return [entry for entry in value if entry.strip()]
