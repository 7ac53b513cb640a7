"""A1111's `parameters` infotext: the text every A1111-aware tool reads back from a PNG.

Format (modules/processing.py `create_infotext`):
    <prompt>
    Negative prompt: <negative prompt>          (line omitted when empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, ...
"""

from __future__ import annotations

import json
import re
from typing import Any

from sdserve.engine import prompts

# A1111's parse_generation_parameters regex: `Key: value` pairs, values quoted when they hold , : or newlines.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def _quote(value: str) -> str:
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def _format_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _text(value: str) -> str:
    """A prompt as written into infotext. One that could be read back as something else (it spans lines, so a
    line of it could pass for the `Negative prompt:` line or the parameters; it starts with that marker or a
    quote; or it has outer spaces, which a reader strips) is written as one JSON string, which `parse` reads
    back to exactly the prompt asked for. Other prompts are written as they are, as A1111 writes them."""
    risky = (len(value.splitlines()) > 1 or value != value.strip() or value.startswith('"')
             or value.startswith(_NEGATIVE))  # splitlines: every line break a reader may split on
    return json.dumps(value, ensure_ascii=False) if risky else value


def build(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """Build infotext; `params` is an ordered mapping of A1111 keys, None values are dropped."""
    pairs = ", ".join(
        f"{key}: {_quote(_format_number(value))}" for key, value in params.items() if value is not None
    )
    negative = f"\n{_NEGATIVE} {_text(negative_prompt)}" if negative_prompt else ""
    return f"{_text(prompt) if prompt else ''}{negative}\n{pairs}".strip()


# What A1111 1.10's parser (infotext_utils.parse_generation_parameters) fills in for keys an infotext leaves out:
# the values those settings had before they were written into infotexts.
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1", "Hires resize-1": 0, "Hires resize-2": 0, "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler", "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
    "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
    "Masked area padding": 32, "RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0,
    "Schedule min sigma": 0, "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse(text: str) -> dict[str, Any]:
    """Parse infotext the way A1111 1.10 does (png-info's `parameters`): `Prompt`, `Negative prompt`, then each
    key as a string; a `WxH` value becomes `Key-1` and `Key-2` (`Size-1`, `Hires resize-1`, ...) in place of the
    key; then DEFAULTS for keys it leaves out. (A1111 also takes known styles back out of the prompts,
    `infotext_styles`; sdserve leaves the prompts as written.)"""
    lines = text.strip().split("\n")
    result: dict[str, Any] = {}
    last = lines[-1] if lines else ""
    if len(_PARAM_RE.findall(last)) >= 3:
        lines = lines[:-1]
    else:
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(_NEGATIVE):
            in_negative = True
            stripped = stripped[len(_NEGATIVE):].strip()
        (negative_lines if in_negative else prompt_lines).append(stripped)
    result["Prompt"] = _unquote("\n".join(prompt_lines))
    result["Negative prompt"] = _unquote("\n".join(negative_lines))
    for key, value in _PARAM_RE.findall(last):
        value = _unquote(value.strip())
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    for key, value in DEFAULTS.items():
        result.setdefault(key, value)
    # and "Emphasis: Original" (its default) where either prompt weighs a word, as A1111 adds it
    if any(w != 1.0 and (t, w) != prompts.BREAK
           for p in (result["Prompt"], result["Negative prompt"]) for t, w in prompts.parse_attention(p)):
        result.setdefault("Emphasis", "Original")
    return result
