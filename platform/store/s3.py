"""An object store on S3 or an S3-compatible server (SeaweedFS, MinIO, Ceph...), via boto3.

This is the only module that imports boto3 (the ``s3`` extra). Transient failures (5xx,
throttling, dropped connections) are retried by botocore's ``standard`` retry mode; reading a
body that breaks off half-way is retried here. What still fails becomes ``StorageError``,
a missing object ``NotFound``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import BinaryIO

import boto3
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from opbox.errors import ConfigError, NotFound, StorageError, StorageFull, ValidationError

from .base import (MAX_KEY_LENGTH, SignedRequest, check_sha256, retry, shorten, validate_expires, validate_key,
                   validate_prefix)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part (but the last)
_MISSING = {"NoSuchKey", "NotFound", "404"}
_FULL = {"XMinioStorageFull", "InsufficientStorage", "QuotaExceeded"}  # MinIO, Ceph/SeaweedFS-style codes
_DENIED = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "403"}
_BODY_ERRORS = (IncompleteReadError, ResponseStreamingError, ReadTimeoutError)


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        path_style: bool = True,
        public_endpoint_url: str | None = None,
        multipart_threshold: int = 8 * 1024 * 1024,
        max_attempts: int = 4,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ):
        if not bucket:
            raise ConfigError("S3Store needs a bucket name")
        self.bucket = bucket
        prefix = validate_prefix(prefix.strip("/"))
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.path_style = path_style
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "total_max_attempts": max_attempts},  # tries, first included
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Send/check the newer CRC checksums only where S3 requires them: many
            # S3-compatible servers reject or ignore them.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=self.region
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # URLs handed to clients may need another host than the one the platform reaches.
        self._signer = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=max(multipart_threshold, MIN_PART_SIZE),
            max_concurrency=4,
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store('s3://{self.bucket}/{self.prefix}'{where})"

    # -- objects ------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        with self._errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=name, Body=data)

    def put_file(self, key: str, path: str | PathLike[str]) -> None:
        name = self._name(key)
        os.stat(path)  # a missing source is the caller's FileNotFoundError, not a storage error
        with self._errors("put", key):
            self._client.upload_file(os.fspath(path), self.bucket, name, Config=self._transfer)

    def put_stream(self, key: str, stream: BinaryIO) -> None:
        name = self._name(key)
        with self._errors("put", key):  # a non-seekable stream goes up in parts of multipart_chunksize
            self._client.upload_fileobj(stream, self.bucket, name, Config=self._transfer)

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            with self._errors("get", key):
                return self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()

        return retry(read, retry_on=(_BrokenBody,))

    def get_file(self, key: str, path: str | PathLike[str]) -> None:
        name = self._name(key)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("get", key):  # s3transfer writes a temp file and renames it
            self._client.download_file(self.bucket, name, os.fspath(path), Config=self._transfer)

    def open(self, key: str) -> BinaryIO:
        name = self._name(key)
        with self._errors("get", key):
            return self._client.get_object(Bucket=self.bucket, Key=name)["Body"]

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        name = self._name(key)
        try:
            with self._errors("stat", key):
                return self._client.head_object(Bucket=self.bucket, Key=name)["ContentLength"]
        except NotFound:
            return None

    def modified(self, key: str) -> float | None:
        try:
            with self._errors("stat", key):
                return self._client.head_object(Bucket=self.bucket, Key=self._name(key))["LastModified"].timestamp()
        except NotFound:
            return None

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=name)

    def delete_prefix(self, prefix: str) -> int:
        if not validate_prefix(prefix):
            raise ValidationError("delete_prefix needs a non-empty prefix")
        count, batch = 0, []
        for key in self.list(prefix):
            batch.append(key)
            if len(batch) == 1000:  # DeleteObjects' limit
                count += self._delete_batch(batch)
                batch = []
        if batch:
            count += self._delete_batch(batch)
        return count

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_prefix(prefix)
        return self._iter_keys(prefix)

    # -- signed URLs --------------------------------------------------------------------

    def upload_url(
        self,
        key: str,
        expires: int = 900,
        max_size: int | None = None,
        content_type: str = "application/octet-stream",
        sha256: str | None = None,
    ) -> SignedRequest:
        # A presigned PUT cannot bound the size (only a presigned POST policy can): the
        # caller checks size(key) after the upload. The Content-Type is signed, and so is the
        # content's SHA-256 when given: the server refuses a body with another digest.
        params = {"Bucket": self.bucket, "Key": self._name(key), "ContentType": content_type}
        headers = {"Content-Type": content_type}
        if check_sha256(sha256) is not None:
            params["ChecksumSHA256"] = headers["x-amz-checksum-sha256"] = \
                base64.b64encode(bytes.fromhex(sha256)).decode()
        url = self._presign("put_object", params, expires)
        return SignedRequest(url=url, method="PUT", headers=headers)

    def download_url(self, key: str, expires: int = 900) -> SignedRequest:
        url = self._presign("get_object", {"Bucket": self.bucket, "Key": self._name(key)}, expires)
        return SignedRequest(url=url, method="GET", headers={})

    def routes(self) -> list:
        return []  # signed URLs point at S3 itself

    # -- bucket -------------------------------------------------------------------------

    def location(self, key: str) -> dict:
        """Where ``key`` lives, for another S3 client (an in-cluster image build): its
        ``s3://`` URI, the endpoint (None: AWS), the region and the addressing style."""
        return {"uri": f"s3://{self.bucket}/{self._name(key)}", "endpoint_url": self.endpoint_url,
                "region": self.region, "path_style": self.path_style}

    def create_bucket_if_missing(self) -> None:
        try:
            with self._errors("check bucket", ""):
                self._client.head_bucket(Bucket=self.bucket)
            return
        except NotFound:
            pass
        kwargs: dict = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            if _code(e) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._storage_error("create bucket", "", e) from e
        except BotoCoreError as e:
            raise self._storage_error("create bucket", "", e) from e

    # -- internals ----------------------------------------------------------------------

    def _name(self, key: str) -> str:
        name = self.prefix + validate_key(key)
        if len(name.encode()) > MAX_KEY_LENGTH:
            raise ValidationError(
                f"object key is too long for this store: with the prefix {self.prefix!r} "
                f"it is over S3's {MAX_KEY_LENGTH} bytes",
                length=len(name.encode()),
            )
        return name

    def _presign(self, method: str, params: dict, expires: int) -> str:
        with self._errors("sign a URL for", params["Key"]):
            return self._signer.generate_presigned_url(method, Params=params, ExpiresIn=validate_expires(expires))

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("list", prefix):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix) :]

    def _delete_batch(self, keys: list[str]) -> int:
        objects = [{"Key": self.prefix + key} for key in keys]
        with self._errors("delete", keys[0]):
            answer = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        errors = answer.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"S3 could not delete {len(errors)} of {len(keys)} objects in bucket {self.bucket!r}, "
                f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip()
            )
        return len(keys)

    @contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Turn boto3's errors into the opbox hierarchy."""
        try:
            yield
        except ClientError as e:
            if _code(e) in _MISSING:
                raise NotFound(f"object {shorten(key)!r} not found", key=key) from None
            raise self._storage_error(op, key, e) from e
        except _BODY_ERRORS as e:
            raise _BrokenBody(f"S3 {op} {shorten(key)!r}: the connection broke off: {e}", key=key) from e
        except (BotoCoreError, S3UploadFailedError, S3TransferFailedError) as e:
            raise self._storage_error(op, key, e) from e

    def _storage_error(self, op: str, key: str, error: Exception) -> StorageError:
        where = f"bucket {self.bucket!r}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        what = f"S3 {op} {shorten(key)!r} in {where}" if key else f"S3 {op} {where}"
        if isinstance(error, NoCredentialsError):
            return StorageError(
                f"{what} failed: no S3 credentials "
                "(pass access_key/secret_key or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(error, ClientError):
            code = _code(error)
            if code == "NoSuchBucket":
                return StorageError(f"{what} failed: the bucket does not exist", code=code)
            if code in _DENIED:
                return StorageError(
                    f"{what} failed: access denied ({code}); check the S3 access key and secret key", code=code
                )
            message = error.response.get("Error", {}).get("Message") or ""
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 507 or code in _FULL:
                return StorageFull(f"{what} failed: the S3 server is out of space ({code} {message})".rstrip(),
                                   code=code)
            return StorageError(f"{what} failed: HTTP {status} {code} {message}".rstrip(), code=code, status=status)
        text = str(error)
        if any(code in text for code in _DENIED - {"403"}):  # s3transfer flattens ClientError to text
            return StorageError(f"{what} failed: access denied; check the S3 access key and secret key ({text})")
        return StorageError(f"{what} failed: {text}")


class _BrokenBody(StorageError):
    """A response body that broke off: worth another try."""


def _code(error: ClientError) -> str:
    return str(
        error.response.get("Error", {}).get("Code")
        or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )
