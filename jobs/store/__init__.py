"""The artifact store: a local folder or any S3-compatible bucket, and the runs jobs commit in it.

``open_store(uri)`` gives the backend for a location; :mod:`jobs.store.runs` is how jobs write
runs and readers find them.
"""

from __future__ import annotations

from typing import Any

from jobs.store.base import (
    BucketNotFoundError,
    MissingKeyError,
    ObjectInfo,
    Store,
    StoreAccessError,
    StoreError,
    check_key,
)
from jobs.store.local import LocalStore
from jobs.store.runs import MANIFEST, RunWriter, begin_run, committed_runs, read_manifest, run_prefix
from jobs.uris import parse_uri

__all__ = [
    "MANIFEST", "BucketNotFoundError", "LocalStore", "MissingKeyError", "ObjectInfo", "RunWriter", "Store",
    "StoreAccessError", "StoreError", "begin_run", "check_key", "committed_runs", "open_store",
    "read_manifest", "read_uri_bytes", "run_prefix", "store_for_file",
]


def open_store(uri: str, endpoint_url: str | None = None, **options: Any) -> Store:
    """A :class:`LocalStore` for a path or ``file://`` URI, an ``S3Store`` for ``s3://``.
    ``options`` go to the backend (e.g. ``multipart_threshold`` for S3)."""
    loc = parse_uri(uri)
    if loc.is_s3:
        from jobs.store.s3 import S3Store  # boto3 is imported only when S3 is used

        return S3Store(loc.bucket or "", loc.path, endpoint_url=endpoint_url, **options)
    return LocalStore(loc.local_path())


def read_uri_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The bytes of one file given by a path, file:// or s3:// URI (e.g. a model checkpoint)."""
    store, key = store_for_file(uri, endpoint_url)
    return store.get_bytes(key)


def store_for_file(uri: str, endpoint_url: str | None = None) -> tuple[Store, str]:
    """The store holding the file ``uri`` names, and its key there."""
    loc = parse_uri(uri)
    parent, name = loc.parent_and_name()
    return open_store(str(parent), endpoint_url), name
