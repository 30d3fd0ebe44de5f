"""The artifact store's interface: bytes under '/'-separated keys, on a local folder or S3.

Keys are relative to the store root; ``..``, absolute keys and backslashes are rejected so a key
can never escape the root, whichever backend it lands on. Backends: :mod:`jobs.store.local`,
:mod:`jobs.store.s3`; runs (folders committed by a manifest) are :mod:`jobs.store.runs`.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

# Local writes go to a temp file beside the target and are renamed into place, so a reader never
# sees half a file; the suffix keeps a crashed writer's temp files out of listings.
TMP_SUFFIX = ".zfatlas-tmp"
# A run's lease sits beside its folder: ``<kind>/<run_id>.lease`` (jobs.store.lease).
LEASE_SUFFIX = ".lease"
#: Names that end so are the store's own: no run id may (a run "x.lease" would be run x's lease).
RESERVED_SUFFIXES = (TMP_SUFFIX, LEASE_SUFFIX)


class StoreError(Exception):
    """A store operation failed for a reason the user must fix (bucket, credentials, endpoint)."""


class BucketNotFoundError(StoreError):
    """The S3 bucket does not exist (or the endpoint is not the one meant)."""


class StoreAccessError(StoreError):
    """Missing, wrong or insufficient credentials."""


class MissingKeyError(StoreError, FileNotFoundError):
    """The key does not exist (also a FileNotFoundError, so callers can treat stores like files)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def check_key(key: str, *, prefix: bool = False) -> str:
    """``key`` if it is a safe relative key, else ValueError. With ``prefix``, "" and a trailing
    "/" are allowed (they select a whole folder)."""
    if not isinstance(key, str):
        raise ValueError(f"store keys are strings, not {type(key).__name__}")
    if prefix and key == "":
        return key
    if not key:
        raise ValueError("empty store key")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"store key {key!r} contains a backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"store key {key!r} is absolute; keys are relative to the store root")
    body = key[:-1] if prefix and key.endswith("/") else key
    for seg in body.split("/"):
        if seg in ("", ".", ".."):
            raise ValueError(f"store key {key!r} has an empty, '.' or '..' segment")
    if body.endswith(TMP_SUFFIX):
        raise ValueError(f"store key {key!r} uses the reserved suffix {TMP_SUFFIX}")
    return key


def segment(value: str, what: str) -> str:
    check_key(value)
    if "/" in value:
        raise ValueError(f"{what} {value!r} must not contain '/'")
    if value.endswith(RESERVED_SUFFIXES):
        reserved = ", ".join(RESERVED_SUFFIXES)
        raise ValueError(f"{what} {value!r} ends in a suffix the store reserves ({reserved})")
    return value


def json_default(value: Any) -> Any:
    # Runners hand over numpy counts and datetimes; make them plain JSON instead of failing commit.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Store(ABC):
    """Bytes under '/'-separated keys, through a backend's primitives."""

    #: A folder of the machine that opened it: other machines see the same objects only through a
    #: shared file system (an S3 store is the same from everywhere).
    machine_local = False

    # --- backend primitives ---

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, atomic: bool = True) -> None:
        """Write ``data`` at ``key``. ``atomic=False``: a reader may see the object half-written
        (the local backend then skips the temp file and rename): for files nobody reads until a
        commit, such as those of an uncommitted run."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str], *, atomic: bool = True) -> None:
        """Upload a local file without reading it into memory (checkpoints); ``atomic`` as for
        :meth:`put_bytes`."""

    def move_file(self, key: str, path: str | os.PathLike[str], *, atomic: bool = True) -> None:
        """:meth:`put_file`, and the local file is gone afterwards (the local backend renames it
        when it is on the store's file system instead of copying it)."""
        self.put_file(key, path, atomic=atomic)
        os.unlink(path)

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; :class:`MissingKeyError` if there is none."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Download to a local file without holding it in memory."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a string prefix, as in S3), sorted by key."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate "folders" under ``prefix`` ("" or ending in "/"), sorted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object whose key starts with ``prefix`` (must not be empty)."""

    # --- conditional writes (run leases): each is one atomic step on the backend ---

    @abstractmethod
    def create_exclusive(self, key: str, data: bytes) -> str | None:
        """Create ``key`` with ``data`` only if no object has that key; returns the new object's
        version (an opaque token), or None if the key exists. Never half-visible."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and version; :class:`MissingKeyError` if there is none."""

    @abstractmethod
    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        """Overwrite ``key`` only while its version is still ``version``; returns the new version,
        or None if it changed or is gone."""

    @abstractmethod
    def delete_if(self, key: str, version: str) -> bool:
        """Delete ``key`` only while its version is still ``version``; whether it was deleted."""

    @abstractmethod
    def uri_of(self, key: str) -> str:
        """Where ``key`` lives: an absolute path (local) or an ``s3://`` URI."""

    @abstractmethod
    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the store root's path in it, for pyarrow.dataset readers."""

    @abstractmethod
    def check(self) -> None:
        """Fail early, with a clear :class:`StoreError`, if the store cannot be used."""

    def check_readable(self) -> None:
        """Fail early if the store cannot be read (readers need no write access); default: check()."""
        self.check()

    # --- derived ---

    def list_keys(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_objects(prefix)]

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, indent=2, default=json_default).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))
