"""Content moderation: prompts at submission (a blocklist), every finished image before it is visible.

`--moderation`:
- `none` (the default): images are stored as made;
- `safety-checker`: diffusers' `StableDiffusionSafetyChecker` (weights from `--safety-checker DIR`, with the
  `feature_extractor` it reads images through), run by the worker on each batch's images;
- `http://…` or `https://…`: a hook that receives each image (`POST`, body: the PNG, `Content-Type:
  image/png`, headers `X-Sdserve-Job` and `X-Sdserve-Label`) and answers JSON `{"allow": true}` or
  `{"allow": false, "reason": "…"}`. A hook that cannot answer (down, slow past `--moderation-timeout-s`, a
  non-2xx status or another body) fails the job as unavailable: nothing unchecked is ever shown.

A blocked image is never stored. The job keeps its place in the record (`blocked: true` and the reason, no
URL); each dialect answers in its own documented form (README: Moderation).

`--blocklist FILE`: words or phrases, one per line (`#` starts a comment), matched case-insensitively as whole
words in the prompt (and a hires prompt), not in the negative prompt, where people name what they do not want.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from PIL import Image

    from sdserve.config import Settings


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None


ALLOWED = Verdict(True)


class ModerationUnavailable(Exception):
    """The check could not be made: the images are not shown, the job fails as unavailable."""


class Moderator(Protocol):
    name: str

    def check(self, images: Sequence[Image.Image], pngs: Sequence[bytes], *, job_id: str,
              label: str | None) -> list[Verdict]:
        """One verdict per image of one job. Raises ModerationUnavailable."""


class NoModeration:
    name = "none"

    def check(self, images, pngs, *, job_id, label) -> list[Verdict]:
        return [ALLOWED] * len(pngs)


class HttpHook:
    """Seed 004's object-storage moderation, moved to where the image is made: a service you run decides."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        import httpx

        self.name = url
        self.url = url
        self._client = httpx.Client(timeout=timeout_s)

    def check(self, images, pngs, *, job_id, label) -> list[Verdict]:
        import httpx

        verdicts = []
        for png in pngs:
            try:
                response = self._client.post(self.url, content=png, headers={
                    "Content-Type": "image/png", "X-Sdserve-Job": job_id, "X-Sdserve-Label": label or ""})
                response.raise_for_status()
                answer = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise ModerationUnavailable(f"the moderation hook did not answer: {exc}") from None
            if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
                raise ModerationUnavailable(f'the moderation hook answered {str(answer)[:200]!r}, not {{"allow": '
                                            'true|false, "reason": "..."}')
            verdicts.append(Verdict(answer["allow"], None if answer["allow"] else
                                    str(answer.get("reason") or "blocked by the moderation hook")))
        return verdicts


class SafetyChecker:
    """diffusers' StableDiffusionSafetyChecker: CLIP image embeddings compared against concept embeddings."""

    name = "safety-checker"

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        # A pipeline's folder (safety_checker/ and feature_extractor/ inside) or the checker's own folder with
        # the processor's preprocessor_config.json beside its weights.
        weights = folder / "safety_checker" if (folder / "safety_checker").is_dir() else folder
        processor = folder / "feature_extractor" if (folder / "feature_extractor").is_dir() else folder
        try:
            self.model = StableDiffusionSafetyChecker.from_pretrained(weights, use_safetensors=True).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(processor)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--safety-checker {folder}: cannot load StableDiffusionSafetyChecker weights and "
                             f"its feature_extractor there: {exc}") from None
        self.device = device

    def check(self, images, pngs, *, job_id, label) -> list[Verdict]:
        import numpy as np
        import torch

        inputs = self.processor(list(images), return_tensors="pt").pixel_values.to(self.device, self.model.dtype)
        arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images])
        with torch.no_grad():
            _, flagged = self.model(images=arrays, clip_input=inputs)
        return [Verdict(False, "the safety checker flagged it (nsfw)") if bad else ALLOWED for bad in flagged]


def open_moderator(settings: Settings, device: str = "cpu") -> Moderator:
    if settings.moderation == "none":
        return NoModeration()
    if settings.moderation == "safety-checker":
        if settings.safety_checker is None:
            raise ValueError("--moderation safety-checker needs --safety-checker DIR (the checker's weights)")
        return SafetyChecker(settings.safety_checker, device)
    return HttpHook(settings.moderation, settings.moderation_timeout_s)


class Blocklist:
    def __init__(self, terms: Sequence[str] = ()) -> None:
        self.terms = [t for t in (term.strip().lower() for term in terms) if t]
        # Whole words; a phrase matches whatever whitespace separates its words.
        phrases = (r"\s+".join(map(re.escape, term.split())) for term in self.terms)
        self._pattern = re.compile("|".join(rf"(?<!\w)(?:{p})(?!\w)" for p in phrases),
                                   re.IGNORECASE) if self.terms else None

    @classmethod
    def load(cls, path: Path | None) -> Blocklist:
        if path is None:
            return cls()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"--blocklist {path}: {exc.strerror or exc}") from None
        return cls([line.split("#", 1)[0] for line in lines])

    def match(self, text: str) -> str | None:
        """The blocked term the text contains, or None."""
        if self._pattern is None or not text:
            return None
        found = self._pattern.search(text)
        return found[0].lower() if found else None
