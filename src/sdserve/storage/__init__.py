"""Image stores: where input and output images live, by key. `open_store(url)` picks one:

- `file:///path` (the default: `<data dir>/images`): a local folder;
- `s3://BUCKET/PREFIX?endpoint_url=http://HOST:PORT&region=REGION`: S3 or any S3-compatible server,
  with boto3's standard credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, roles).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlparse

# Keys are made by the server, never by a client: 32 hex digits, or a job's id and an image index.
_KEY = re.compile(r"^[0-9a-f]{32}(-[0-9]{1,3})?$")


def valid_key(key: str) -> bool:
    return bool(_KEY.fullmatch(key))


class StoreError(OSError):
    """The store refused or failed a write or a read (disk full, bucket unreachable, ...). `transient`: it may
    work if tried again shortly (the server could not be reached, or answered 5xx)."""

    transient = False


class ImageStore(Protocol):
    location: str  # where it stores, for logs and the docs: a folder or s3://bucket/prefix

    def put(self, data: bytes, key: str | None = None) -> str:
        """Store the bytes and return their key. With a key: store only if the key is new (the first writer
        wins, so a job's images are stored once even if two workers raced on it); returns the key either way."""

    def get(self, key: str) -> bytes | None: ...

    def url(self, key: str, ttl_s: int) -> str | None:
        """A URL that reads the image without credentials for `ttl_s` seconds (presigned), or None when the
        store has no such URLs (a local folder: the API serves the bytes)."""

    def uri(self, key: str) -> str | None:
        """The image's location in the store's own terms (`s3://bucket/key`), or None."""

    def probe(self) -> None:
        """Raise StoreError if the store cannot take a write now."""

    def prune(self, before: float) -> int:
        """Retention: delete the images (outputs and inputs) stored before this unix time; returns how many."""


def open_store(url: str | None, data_dir: Path) -> ImageStore:
    from sdserve.storage.local import LocalImageStore

    if not url:
        return LocalImageStore(data_dir / "images")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalImageStore(Path(parsed.path))
    if parsed.scheme == "s3":
        from sdserve.storage.s3 import S3ImageStore

        if not parsed.netloc:
            raise ValueError(f"--storage {url!r}: an s3 URL names a bucket: s3://BUCKET/PREFIX")
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        unknown = set(query) - {"endpoint_url", "region"}
        if unknown:
            raise ValueError(f"--storage: unknown s3 option(s) {', '.join(sorted(unknown))}; "
                             "known: endpoint_url, region")
        return S3ImageStore(parsed.netloc, parsed.path.strip("/"), endpoint_url=query.get("endpoint_url"),
                            region=query.get("region"))
    raise ValueError(f"--storage {url!r}: use file:///path or s3://bucket/prefix?endpoint_url=...")
