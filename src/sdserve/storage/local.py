"""Images in a local directory, named by keys the server makes (never by anything a client sends)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from sdserve.health import probe_folder
from sdserve.storage import StoreError, valid_key


class LocalImageStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        # Two-level fan-out keeps directories small; the key is validated, so no path tricks get through.
        return self.root / key[:2] / f"{key}.png"

    def put(self, data: bytes, key: str | None = None) -> str:
        key = key or uuid.uuid4().hex
        if not valid_key(key):
            raise ValueError(f"not an image key: {key!r}")
        path = self._path(key)
        tmp = path.with_name(f".{key}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(data)
            # A hard link never replaces an existing file: the first writer of a key wins.
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StoreError(exc.errno, f"image store {self.root}: {exc.strerror or exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def get(self, key: str) -> bytes | None:
        if not valid_key(key):
            return None
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def url(self, key: str, ttl_s: int) -> str | None:
        return None

    def uri(self, key: str) -> str | None:
        return None

    def prune(self, before: float) -> int:
        deleted = 0
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.glob("*.png"):
                try:
                    if path.stat().st_mtime < before:
                        path.unlink()
                        deleted += 1
                except FileNotFoundError:
                    pass  # another process pruned it
        return deleted

    def probe(self) -> None:
        try:
            probe_folder(self.root)
        except OSError as exc:
            raise StoreError(exc.errno, f"image store {self.root}: {exc.strerror or exc}") from exc
