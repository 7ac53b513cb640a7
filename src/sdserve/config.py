"""Settings shared by every entry point. Each field reads `SDSERVE_<NAME>` from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        # SDSERVE_API_KEYS="k1,k2" is friendlier than a JSON list in a shell or a Helm value.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
