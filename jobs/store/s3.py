"""The S3 backend of :class:`jobs.store.Store`: any S3-compatible endpoint through boto3.

Endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, profiles, ...) or an explicit ``endpoint_url``. Credentials
are resolved by boto3 in each process and are never stored on the object, pickled or logged.

An explicit ``endpoint_url`` (a spec's, a manifest's) gets this process's credentials only if it is
allowed (:func:`endpoint_allowed`): listed in ``ZFATLAS_S3_ENDPOINTS`` (comma-separated URLs), the
environment's own ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, or named by the operator of this
process (:func:`trust_endpoint`: a command-line flag, a server setting). Any other endpoint is
refused with :class:`EndpointNotAllowedError` before a request is made, so a submitted spec cannot
have a job sign requests, with the cluster's keys, to a host of its choosing.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import boto3
import pyarrow.fs as pafs
from boto3.s3.transfer import S3UploadFailedError, TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from jobs.store.base import (
    BucketNotFoundError,
    MissingKeyError,
    ObjectInfo,
    Store,
    StoreAccessError,
    StoreError,
    check_key,
)

log = logging.getLogger(__name__)

# botocore's DEBUG records include signed request headers (the access key id and signatures);
# `zfatlas -v` turns on DEBUG for the root logger, so keep these libraries at INFO unless a user
# configured them explicitly.
for _name in ("botocore", "boto3", "s3transfer"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)

# Clients are created lazily, possibly by several reader threads at once; one is enough.
_CLIENT_LOCK = threading.Lock()

ENDPOINTS_ENV = "ZFATLAS_S3_ENDPOINTS"
_ENVIRONMENT_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TRUSTED: set[str] = set()  # endpoints this process's operator named (trust_endpoint)
_TRUSTED_LOCK = threading.Lock()

MIB = 1 << 20
# S3 rejects multipart parts under 5 MiB (except the last), so chunks never go below that.
_MIN_PART = 5 * MIB
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "403",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
# A conditional request whose condition failed, or that lost to a concurrent one.
_PRECONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class EndpointNotAllowedError(StoreAccessError):
    """An S3 endpoint that may not be sent this process's credentials (not in the allow-list)."""


def normalize_endpoint(url: str) -> str:
    """``url`` in one spelling (scheme and host lower-cased, default port explicit, no trailing
    slash), so the allow-list matches however a URL is written."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return url.strip()
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def allowed_endpoints() -> set[str]:
    """The endpoints this process sends credentials to (normalized): ``ZFATLAS_S3_ENDPOINTS``, the
    environment's ``AWS_ENDPOINT_URL(_S3)``, and those named by :func:`trust_endpoint`."""
    urls = [u for u in os.environ.get(ENDPOINTS_ENV, "").split(",") if u.strip()]
    urls += [os.environ[name] for name in _ENVIRONMENT_ENDPOINTS if os.environ.get(name)]
    with _TRUSTED_LOCK:
        trusted = set(_TRUSTED)
    return {normalize_endpoint(u) for u in urls} | trusted


def endpoint_allowed(url: str | None) -> bool:
    """Whether requests to ``url`` may carry credentials; None (AWS itself, or the environment's
    own endpoint) always may."""
    return url is None or normalize_endpoint(url) in allowed_endpoints()


def check_endpoint(url: str | None) -> None:
    """:class:`EndpointNotAllowedError` unless :func:`endpoint_allowed`."""
    if not endpoint_allowed(url):
        raise EndpointNotAllowedError(
            f"not sending AWS credentials to S3 endpoint {url}: it is not an allowed endpoint; if it is "
            f"yours, add it to {ENDPOINTS_ENV} (comma-separated URLs) where this runs"
        )


def trust_endpoint(url: str) -> None:
    """Allow ``url`` in this process (not in jobs it starts): for endpoints the operator named
    (``--endpoint-url``, ``ZFATLAS_API_ENDPOINT_URL``), as opposed to ones read from specs."""
    with _TRUSTED_LOCK:
        _TRUSTED.add(normalize_endpoint(url))


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``.

    ``multipart_threshold``: uploads at least this large go through boto3's transfer manager as
    parallel multipart uploads (parts of ``max(threshold, 5 MiB)``); smaller ones are one PUT.
    Requests retry with exponential backoff on 5xx, throttling and connection errors (botocore's
    ``standard`` mode, ``max_attempts`` tries in all).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart_threshold: int = 8 * MIB,
        max_attempts: int = 5,
        max_concurrency: int = 8,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        self.max_attempts = max_attempts
        self.max_concurrency = max_concurrency

    def __repr__(self) -> str:
        return f"S3Store({self.uri_of('')!r}, endpoint_url={self.endpoint_url!r})"

    # The boto3 client holds sockets and credentials: it is created lazily in each process and
    # left out of pickles (Ray ships stores to workers).
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cached")}

    @property
    def _client(self) -> Any:
        client = self.__dict__.get("_cached_client")
        if client is not None:
            return client
        with _CLIENT_LOCK:
            return self.__dict__.get("_cached_client") or self._new_client()

    def _new_client(self) -> Any:
        check_endpoint(self.endpoint_url)  # before boto3 resolves credentials, before any request
        session = boto3.session.Session()
        custom = (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        config = Config(
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=120,
            max_pool_connections=max(10, self.max_concurrency * 2),
            # Custom endpoints (MinIO, moto, Ceph, ...) generally only route path-style URLs.
            s3={"addressing_style": "path"} if custom else None,
        )
        client = session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=session.region_name or "us-east-1",
            config=config,
        )
        self.__dict__["_cached_client"] = client
        log.debug("S3 client for %s via %s", self.uri_of(""), client.meta.endpoint_url)
        return client

    @property
    def _transfer(self) -> TransferConfig:
        chunk = max(self.multipart_threshold, _MIN_PART)
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=chunk,
            max_concurrency=self.max_concurrency,
        )

    def _key(self, key: str, *, prefix: bool = False) -> str:
        check_key(key, prefix=prefix)
        if not self.prefix:
            return key
        return f"{self.prefix}/{key}" if key else f"{self.prefix}/"

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        """Turn botocore's errors into StoreErrors that name the bucket and key."""
        where = f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"
        try:
            yield
        except ClientError as exc:
            raise self._translate(exc, where) from None
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise StoreAccessError(
                f"no usable AWS credentials for {where} ({exc}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        except EndpointConnectionError as exc:
            raise StoreError(f"cannot reach the S3 endpoint for {where}: {exc}") from None
        except S3UploadFailedError as exc:
            # The transfer manager wraps the ClientError in a message; ask the bucket what is wrong.
            self._diagnose(where)
            raise StoreError(f"upload to {where} failed: {exc}") from None
        except BotoCoreError as exc:
            raise StoreError(f"S3 request for {where} failed: {exc}") from None

    def _translate(self, exc: ClientError, where: str) -> StoreError:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        endpoint = self._client.meta.endpoint_url
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket {self.bucket!r} does not exist at {endpoint} (for {where})")
        if code in _ACCESS_CODES:
            return StoreAccessError(
                f"access to {where} denied ({code}): check the AWS credentials and that they may use "
                f"bucket {self.bucket!r} at {endpoint}"
            )
        if code in _MISSING_KEY_CODES:
            return MissingKeyError(f"no such key: {where}")
        return StoreError(f"S3 error {code} for {where}: {exc}")

    def _diagnose(self, where: str) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise BucketNotFoundError(
                    f"bucket {self.bucket!r} does not exist at {self._client.meta.endpoint_url} (for {where})"
                ) from None
            raise self._translate(exc, where) from None

    def check(self) -> None:
        with self._errors():
            self._diagnose(f"s3://{self.bucket}")

    def check_readable(self) -> None:
        """For readers: the same question (does the bucket answer these credentials?); HeadBucket
        needs no write access."""
        self.check()

    # --- primitives ---

    def put_bytes(self, key: str, data: bytes, *, atomic: bool = True) -> None:
        full = self._key(key)  # an S3 PUT is atomic whatever ``atomic`` says
        with self._errors(full):
            if len(data) < self.multipart_threshold:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=data)
            else:
                self._client.upload_fileobj(io.BytesIO(data), self.bucket, full, Config=self._transfer)

    def put_file(self, key: str, path: str | os.PathLike[str], *, atomic: bool = True) -> None:
        full = self._key(key)
        with self._errors(full):
            self._client.upload_file(os.fspath(path), self.bucket, full, Config=self._transfer)

    # --- conditional writes: S3's If-None-Match / If-Match, the version is the ETag ---

    def _conditional(self, call: Any, full: str, **kwargs: Any) -> dict[str, Any] | None:
        """``call`` with a precondition; None when S3 says it does not hold (412), when a
        concurrent conditional write won (409), or when the object is gone (404)."""
        try:
            with self._errors(full):
                try:
                    return call(Bucket=self.bucket, Key=full, **kwargs)
                except ClientError as exc:
                    if str(exc.response.get("Error", {}).get("Code", "")) in _PRECONDITION_CODES:
                        return None
                    raise
        except MissingKeyError:
            return None

    def create_exclusive(self, key: str, data: bytes) -> str | None:
        full = self._key(key)
        done = self._conditional(self._client.put_object, full, Body=data, IfNoneMatch="*")
        return done["ETag"] if done else None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        full = self._key(key)
        with self._errors(full):
            got = self._client.get_object(Bucket=self.bucket, Key=full)
            return got["Body"].read(), got["ETag"]

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        full = self._key(key)
        done = self._conditional(self._client.put_object, full, Body=data, IfMatch=version)
        return done["ETag"] if done else None

    def delete_if(self, key: str, version: str) -> bool:
        full = self._key(key)
        return self._conditional(self._client.delete_object, full, IfMatch=version) is not None

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        with self._errors(full):
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        full = self._key(key)
        with self._errors(full):
            self._client.download_file(self.bucket, full, os.fspath(path), Config=self._transfer)

    def exists(self, key: str) -> bool:
        full = self._key(key)
        try:
            with self._errors(full):
                self._client.head_object(Bucket=self.bucket, Key=full)
        except MissingKeyError:
            return False
        return True

    def _pages(self, prefix: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors(prefix):
            yield from paginator.paginate(Bucket=self.bucket, Prefix=prefix, **kwargs)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix, prefix=True)
        out = [
            ObjectInfo(self._rel(obj["Key"]), int(obj["Size"]))
            for page in self._pages(full)
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")  # "folder" placeholder objects made by some tools
        ]
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str = "") -> list[str]:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"list_dirs needs a folder prefix ending in '/', got {prefix!r}")
        full = self._key(prefix, prefix=True)
        names = {
            p["Prefix"][len(full) :].rstrip("/")
            for page in self._pages(full, Delimiter="/")
            for p in page.get("CommonPrefixes", [])
        }
        return sorted(n for n in names if n)

    def delete_prefix(self, prefix: str) -> None:
        if not check_key(prefix, prefix=True):
            raise ValueError("refusing to delete the whole store (empty prefix)")
        keys = [self._key(o.key) for o in self.list_objects(prefix)]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            with self._errors(prefix):
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StoreError(
                    f"could not delete {len(resp['Errors'])} objects under s3://{self.bucket}/{prefix}, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def uri_of(self, key: str) -> str:
        full = self._key(key, prefix=True).rstrip("/") if key or self.prefix else ""
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        return _arrow_s3(self), f"{self.bucket}/{self.prefix}".rstrip("/")


def _arrow_s3(store: S3Store) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem with the same endpoint, region and credentials as boto3 resolves."""
    client = store._client
    creds = boto3.session.Session().get_credentials()
    kwargs: dict[str, Any] = {
        "region": client.meta.region_name,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=store.max_attempts),
    }
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key)
        if frozen.token:
            kwargs["session_token"] = frozen.token
    endpoint = client.meta.endpoint_url
    if endpoint and not urlsplit(endpoint).netloc.endswith("amazonaws.com"):
        parts = urlsplit(endpoint)
        kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
    return pafs.S3FileSystem(**kwargs)
