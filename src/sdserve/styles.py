"""Prompt styles, as A1111 keeps them: a `styles.csv` (columns `name`, `prompt`, `negative_prompt`) in the models
folder or the data folder. A style's prompt holds `{prompt}` where the request's prompt goes; without it, the
style is appended after a comma. The file is read again when it changes."""

from __future__ import annotations

import csv
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILENAME = "styles.csv"


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


class UnknownStyle(KeyError):
    pass


def merge(style_text: str, text: str) -> str:
    """A1111's merge_prompts: the text in place of `{prompt}`, else both joined with ", " (empty parts left out)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", text)
    return ", ".join(part for part in (text.strip(), style_text.strip()) if part)


def parse(content: str) -> dict[str, Style]:
    rows = csv.DictReader(io.StringIO(content))
    found: dict[str, Style] = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if name:
            found[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "")
    return found


class StyleBook:
    """The styles of the first styles.csv found among `folders`."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.folders = list(folders)
        self._read: tuple[Path | None, int, dict[str, Style]] = (None, -1, {})
        self._lock = threading.Lock()

    def path(self) -> Path | None:
        return next((f / FILENAME for f in self.folders if (f / FILENAME).is_file()), None)

    def all(self) -> dict[str, Style]:
        path = self.path()
        if path is None:
            return {}
        try:
            stamp = path.stat().st_mtime_ns
            with self._lock:
                if self._read[:2] != (path, stamp):
                    self._read = (path, stamp, parse(path.read_text(encoding="utf-8-sig")))
                return self._read[2]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            log.warning("%s: cannot read it: %s", path, exc)
            return {}

    def apply(self, names: Sequence[str], prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompts with each named style applied in order; UnknownStyle names one that is not listed."""
        known = self.all()
        for name in names:
            style = known.get(name)
            if style is None:
                listed = ", ".join(sorted(known)) or f"none: put a {FILENAME} in the models or data folder"
                raise UnknownStyle(f"no style {name!r}; styles: {listed}")
            prompt, negative_prompt = merge(style.prompt, prompt), merge(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt
