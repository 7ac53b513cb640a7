"""Images in S3 or an S3-compatible server (SeaweedFS, MinIO, R2, ...), read back through presigned URLs.

Credentials come from boto3's standard chain; anonymous reads of the bucket are never needed.
"""

from __future__ import annotations

import uuid

from sdserve.storage import StoreError, valid_key


def _store_error(location: str, exc: Exception) -> StoreError:
    """A StoreError for a failed S3 call: transient when the server could not be reached or answered 5xx."""
    from botocore.exceptions import ClientError

    error = StoreError(f"{location}: {exc}")
    error.transient = (not isinstance(exc, ClientError)
                       or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500)
    return error


class S3ImageStore:
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}"
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"},
                          connect_timeout=5, read_timeout=30),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}{key}.png"

    def put(self, data: bytes, key: str | None = None) -> str:
        from botocore.exceptions import BotoCoreError, ClientError

        conditional = key is not None
        key = key or uuid.uuid4().hex
        if not valid_key(key):
            raise ValueError(f"not an image key: {key!r}")
        extra = {"IfNoneMatch": "*"} if conditional else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":  # else: stored already
                raise _store_error(self.location, exc) from exc
        except BotoCoreError as exc:  # unreachable, timed out
            raise _store_error(self.location, exc) from exc
        return key

    def get(self, key: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not valid_key(key):
            return None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise _store_error(self.location, exc) from exc
        except BotoCoreError as exc:
            raise _store_error(self.location, exc) from exc

    def url(self, key: str, ttl_s: int) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=ttl_s)

    def uri(self, key: str) -> str | None:
        return f"s3://{self.bucket}/{self._key(key)}"

    def prune(self, before: float) -> int:
        """Lists the prefix and deletes what is older. A bucket lifecycle rule (README: Retention) does the
        same without listing; with one in place, `--keep-images-days 0` leaves it to the rule."""
        from botocore.exceptions import BotoCoreError, ClientError

        deleted = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                old = [{"Key": o["Key"]} for o in page.get("Contents", [])
                       if o["Key"].endswith(".png") and o["LastModified"].timestamp() < before]
                for i in range(0, len(old), 1000):
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old[i:i + 1000], "Quiet": True})
                    deleted += len(old[i:i + 1000])
        except (BotoCoreError, ClientError) as exc:
            raise StoreError(f"{self.location}: {exc}") from exc
        return deleted

    def probe(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise _store_error(self.location, exc) from exc
