"""LoRA references: A1111's `<lora:name:weight>` prompt tags and the one canonical form a job carries (the
tags taken out of the prompt, merged with the native `loras` field). The files are found by
`addons.loras` (`models/Lora`); the engine (`engine/adapters.py`) loads them into the pipeline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

# `<lora:name>` or `<lora:name:weight>`; A1111 also reads `<lora:name:te:unet>` (one weight each).
TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^>]*))?>")


class LoraRef(BaseModel):
    """One LoRA applied to a job, at a strength (1 = as trained, 0 = not at all, negative inverts it)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., min_length=1, max_length=200, description="A file in models/Lora, without .safetensors.")
    weight: float = Field(1.0, ge=-10.0, le=10.0)


class LoraTagError(ValueError):
    pass


def split_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its `<lora:…>` tags, and the tags as references (weight 1 when none is given).
    Spaces the tags leave behind are collapsed, so `a <lora:x:1> cat` reads `a cat`."""
    found: list[LoraRef] = []

    def take(match: re.Match) -> str:
        name, weight, unet = match.group(1).strip(), match.group(2), match.group(3)
        if unet is not None and unet.strip() != (weight or "").strip():
            raise LoraTagError(f"{match.group(0)}: separate text encoder and UNet weights are not supported; "
                               f"give one weight, <lora:{name}:0.8>")
        try:
            value = 1.0 if weight is None or not weight.strip() else float(weight)
        except ValueError:
            raise LoraTagError(f"{match.group(0)}: the weight must be a number, like <lora:{name}:0.8>") from None
        found.append(LoraRef(name=name, weight=value))
        return " "

    text = TAG.sub(take, prompt)
    if found:
        text = re.sub(r"[ \t]{2,}", " ", text).strip()
    return text, found


def canonical(refs: Iterable[LoraRef]) -> list[LoraRef]:
    """One entry per name, weights summed (two tags of one LoRA apply it twice, as A1111 does), weight-0
    entries dropped (they change nothing, and the job then batches with jobs without them), sorted by name."""
    total: dict[str, float] = {}
    for ref in refs:
        total[ref.name] = total.get(ref.name, 0.0) + ref.weight
    return [LoraRef(name=n, weight=w) for n, w in sorted(total.items()) if w != 0]


def tags(refs: Iterable[LoraRef]) -> str:
    """The references as A1111 prompt tags, for infotexts ("Reuse parameters" gets the same LoRAs back)."""
    return " ".join(f"<lora:{r.name}:{r.weight:g}>" for r in refs)
