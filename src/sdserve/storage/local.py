"""Images in a local directory, named by opaque random ids (never by anything a client sends)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

_ID = re.compile(r"^[0-9a-f]{32}$")


def valid_image_id(image_id: str) -> bool:
    return bool(_ID.fullmatch(image_id))


class LocalImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, image_id: str) -> Path:
        # Two-level fan-out keeps directories small; the id is validated, so no path tricks get through.
        return self.root / image_id[:2] / f"{image_id}.png"

    def put(self, png: bytes) -> str:
        image_id = uuid.uuid4().hex
        path = self._path(image_id)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)
        return image_id

    def get(self, image_id: str) -> bytes | None:
        if not valid_image_id(image_id):
            return None
        try:
            return self._path(image_id).read_bytes()
        except FileNotFoundError:
            return None
