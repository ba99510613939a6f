"""Object storage (S3 or any S3-compatible store) through boto3.

boto3 is imported on first use, not at start-up: it costs ~0.3 s and most screens never need it.
Credentials come only from boto3's own chain (environment, shared credentials file, profile,
instance role); ``[s3] profile`` and ``[s3] credentials_file`` only choose within that chain, and
keys are never printed.

Client config: ``request_checksum_calculation`` / ``response_checksum_validation`` are
``when_required`` because S3-compatible stores (SeaweedFS, MinIO, Ceph) reject or mangle the
CRC trailers newer boto3 versions send by default; atc verifies its own SHA-256 instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

from .config import Settings
from .errors import NotFound, StorageError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: Any = None


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class ObjectStore:
    """The configured bucket, with one-line errors that say what to fix."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.s3.bucket
        self._client = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return self.settings.s3.endpoint_url or "AWS S3"

    def describe(self) -> str:
        return f"{self.endpoint} bucket {self.bucket or '(none)'}"

    @property
    def client(self):
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def _make_client(self):
        if not self.bucket:
            raise StorageError("no S3 bucket configured: set [s3] bucket in the config file")
        import boto3
        import botocore.session
        from botocore.config import Config

        s3 = self.settings.s3
        core = botocore.session.Session(profile=s3.profile or None)
        if s3.credentials_file:
            core.set_config_variable("credentials_file", s3.credentials_file)
        session = boto3.Session(botocore_session=core, region_name=s3.region or None)
        config = Config(
            connect_timeout=s3.connect_timeout,
            read_timeout=s3.read_timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path" if s3.path_style else "auto"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        try:
            return session.client("s3", endpoint_url=s3.endpoint_url or None,
                                  region_name=s3.region or "us-east-1", config=config)
        except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
            raise StorageError(f"cannot set up the S3 client (check [s3] profile/region): {exc}") from None

    # -- error translation -----------------------------------------------------------------------

    def translate(self, exc: Exception, what: str, key: str = "") -> StorageError:
        from botocore.exceptions import (ClientError, EndpointConnectionError, NoCredentialsError,
                                         ConnectTimeoutError, ReadTimeoutError)

        target = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket!r}"
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"{what}: no S3 credentials found (set AWS_* variables, [s3] profile or [s3] credentials_file)")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return StorageError(f"{what}: S3 endpoint {self.endpoint} is unreachable (check [s3] endpoint_url)")
        if isinstance(exc, ReadTimeoutError):
            return StorageError(f"{what}: S3 endpoint {self.endpoint} timed out (s3.read_timeout = {self.settings.s3.read_timeout}s)")
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code in ("NoSuchBucket",) or (code == "404" and not key):
                return StorageError(f"{what}: bucket {self.bucket!r} does not exist at {self.endpoint} (check [s3] bucket)")
            if code in ("NoSuchKey", "404"):
                return NotFound(f"{what}: object {target} does not exist")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"{what}: S3 refused the credentials for {target} ({code}); check the access key and secret")
            return StorageError(f"{what}: S3 error {code} on {target}")
        return StorageError(f"{what}: {type(exc).__name__}: {exc}")

    # -- operations ----------------------------------------------------------------------------

    def check(self) -> None:
        """Raise a one-line StorageError unless the bucket exists and our credentials work."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except StorageError:
            raise
        except Exception as exc:
            raise self.translate(exc, "S3 check") from None

    def head(self, key: str) -> ObjectInfo:
        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self.translate(exc, "S3 head", key) from None
        return ObjectInfo(key=key, size=int(r["ContentLength"]), etag=r.get("ETag", "").strip('"'),
                          last_modified=r.get("LastModified"))

    def read_range(self, key: str, start: int, end_inclusive: int) -> bytes:
        """Bytes [start, end_inclusive] of an object (a ranged GET: never the whole object)."""
        if end_inclusive < start:
            return b""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end_inclusive}")
            return r["Body"].read()
        except Exception as exc:
            raise self.translate(exc, "S3 read", key) from None

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object in chunks without holding it whole."""
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key)
            body = r["Body"]
            while True:
                chunk = body.read(chunk_size)
                if not chunk:
                    break
                yield chunk
        except StorageError:
            raise
        except Exception as exc:
            raise self.translate(exc, "S3 read", key) from None

    def put_bytes(self, key: str, data: bytes, **extra: Any) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
        except Exception as exc:
            raise self.translate(exc, "S3 upload", key) from None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            raise self.translate(exc, "S3 delete", key) from None

    def list(self, prefix: str | None = None) -> Iterator[ObjectInfo]:
        prefix = self.settings.s3.prefix if prefix is None else prefix
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    yield ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=item.get("ETag", "").strip('"'),
                                     last_modified=item.get("LastModified"))
        except StorageError:
            raise
        except Exception as exc:
            raise self.translate(exc, "S3 list") from None

    def log_key(self, step_result_id: int) -> str:
        """Deterministic key for a moved log, so a retried move overwrites instead of duplicating."""
        return f"{self.settings.s3.prefix}step-result/{step_result_id}.json"
