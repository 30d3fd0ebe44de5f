"""The artifact store: one interface over a local folder and S3, and runs committed atomically.

A run lives under ``<kind>/<run_id>/`` and is committed by writing ``manifest.json`` last. Readers
only list runs that have a manifest, so a job that dies mid-write leaves nothing visible, and
:meth:`Store.begin_run` either reports an already committed run (the job no-ops) or deletes an
uncommitted leftover before the job writes again (never duplicates).

Keys are ``/``-separated, relative to the store root; ``..``, absolute keys and backslashes are
rejected so a key can never escape the root, whichever backend it lands on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.uris import parse_uri

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Local writes go to a temp file beside the target and are renamed into place, so a reader never
# sees half a file; the suffix keeps a crashed writer's temp files out of listings.
_TMP_SUFFIX = ".zfatlas-tmp"


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
    if body.endswith(_TMP_SUFFIX):
        raise ValueError(f"store key {key!r} uses the reserved suffix {_TMP_SUFFIX}")
    return key


def _segment(value: str, what: str) -> str:
    check_key(value)
    if "/" in value:
        raise ValueError(f"{what} {value!r} must not contain '/'")
    return value


def fingerprint_bytes(data: bytes) -> str:
    """SHA-256 hex digest (model and dataset fingerprints in manifests)."""
    return hashlib.sha256(data).hexdigest()


# Set by `zfatlas submit` in the job's environment: the submitting checkout's code_version() JSON.
CODE_VERSION_ENV = "ZFATLAS_CODE_VERSION"


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | bool | None]:
    """Package version and, when running from a git checkout, its commit (and whether it has
    uncommitted changes): a manifest then says exactly which code produced a run."""
    try:
        version: str | None = metadata.version("zfatlas")
    except metadata.PackageNotFoundError:
        version = None
    repo = Path(__file__).resolve().parent.parent
    sha, dirty = None, None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout (installed wheel) or no git: the package version has to do
    if sha is None and os.environ.get(CODE_VERSION_ENV):
        # Code shipped to a cluster (zfatlas submit) is no checkout; the submitter recorded its own.
        return {**json.loads(os.environ[CODE_VERSION_ENV]), "shipped": True}
    return {"package": version, "git_sha": sha, "git_dirty": dirty}


def _json_default(value: Any) -> Any:
    # Runners hand over numpy counts and datetimes; make them plain JSON instead of failing commit.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Store(ABC):
    """Bytes under '/'-separated keys, plus runs (``<kind>/<run_id>/`` committed by a manifest)."""

    @staticmethod
    def from_uri(uri: str, endpoint_url: str | None = None, **options: Any) -> Store:
        """A :class:`LocalStore` for a path or ``file://`` URI, an ``S3Store`` for ``s3://``.
        ``options`` go to the backend (e.g. ``multipart_threshold`` for S3)."""
        loc = parse_uri(uri)
        if loc.is_s3:
            from jobs.store_s3 import S3Store  # boto3 is imported only when S3 is used

            return S3Store(loc.bucket or "", loc.path, endpoint_url=endpoint_url, **options)
        return LocalStore(loc.local_path())

    # --- backend primitives ---

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file without reading it into memory (checkpoints)."""

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

    @abstractmethod
    def uri_of(self, key: str) -> str:
        """Where ``key`` lives: an absolute path (local) or an ``s3://`` URI."""

    @abstractmethod
    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the store root's path in it, for pyarrow.dataset readers."""

    @abstractmethod
    def check(self) -> None:
        """Fail early, with a clear :class:`StoreError`, if the store cannot be used."""

    # --- derived ---

    def list_keys(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list_objects(prefix)]

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, json.dumps(value, indent=2, default=_json_default).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    # --- runs ---

    def run_prefix(self, kind: str, run_id: str) -> str:
        return f"{_segment(kind, 'kind')}/{_segment(run_id, 'run id')}"

    def begin_run(self, kind: str, run_id: str, *, keep_leftovers: bool = False) -> RunWriter:
        """A writer for the run: ``already_committed`` if its manifest exists; otherwise whatever an
        earlier, uncommitted attempt left under its prefix is deleted first, unless
        ``keep_leftovers`` (a job that resumes from them, e.g. training from its checkpoints)."""
        prefix = self.run_prefix(kind, run_id)
        try:
            manifest = self.get_json(f"{prefix}/{MANIFEST}")
        except MissingKeyError:
            manifest = None
        if manifest is not None:
            return RunWriter(self, kind, run_id, committed=manifest)
        leftovers = [] if keep_leftovers else self.list_keys(prefix + "/")
        if leftovers:
            log.info("deleting %d files of an uncommitted attempt at %s", len(leftovers), self.uri_of(prefix))
            self.delete_prefix(prefix + "/")
        return RunWriter(self, kind, run_id)

    def read_manifest(self, kind: str, run_id: str) -> dict[str, Any]:
        """The committed manifest; :class:`MissingKeyError` if the run is not committed."""
        prefix = self.run_prefix(kind, run_id)
        try:
            return self.get_json(f"{prefix}/{MANIFEST}")
        except MissingKeyError:
            raise MissingKeyError(f"no committed run {kind}/{run_id} in {self.uri_of('')}") from None

    def list_runs(self, kind: str | None = None, since: datetime | None = None) -> list[dict[str, Any]]:
        """Manifests of committed runs (oldest first), optionally of one kind and committed at or
        after ``since`` (naive datetimes are taken as UTC)."""
        kinds = [_segment(kind, "kind")] if kind else self.list_dirs("")
        cutoff = _parse_iso(_iso(since)) if since else None
        runs = []
        for k in kinds:
            for run_id in self.list_dirs(f"{k}/"):
                try:
                    manifest = self.get_json(f"{k}/{run_id}/{MANIFEST}")
                except MissingKeyError:
                    continue  # in progress or abandoned: not a run yet
                except ValueError:
                    log.warning("ignoring unreadable manifest of %s/%s", k, run_id)
                    continue
                if not isinstance(manifest, dict) or manifest.get("status") != "committed":
                    continue
                if cutoff and _parse_iso(manifest["committed_at"]) < cutoff:
                    continue
                runs.append(manifest)
        return sorted(runs, key=lambda m: m["committed_at"])


class LocalStore(Store):
    """A folder on the local filesystem (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # Absolute, so a store pickled to a worker process with another cwd means the same folder.
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        return self.root / check_key(key, prefix=prefix)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use {self.root} as a store: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreAccessError(f"store folder {self.root} is not writable")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        with open(path, "rb") as src:
            self._atomic_write(self._path(key), lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def _atomic_write(self, target: Path, write: Any) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingKeyError(f"no such key {key!r} in {self.root}") from None

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        if not src.is_file():
            raise MissingKeyError(f"no such key {key!r} in {self.root}")
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        check_key(prefix, prefix=True)
        # Walk only the folder the prefix points into, then filter by the string prefix.
        folder = self.root / prefix.rpartition("/")[0] if prefix else self.root
        if not folder.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if name.endswith(_TMP_SUFFIX):
                    continue
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, full.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str = "") -> list[str]:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"list_dirs needs a folder prefix ending in '/', got {prefix!r}")
        folder = self._path(prefix, prefix=True)
        if not folder.is_dir():
            return []
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))

    def delete_prefix(self, prefix: str) -> None:
        if not check_key(prefix, prefix=True):
            raise ValueError("refusing to delete the whole store (empty prefix)")
        if prefix.endswith("/"):
            shutil.rmtree(self._path(prefix, prefix=True), ignore_errors=True)
            return
        folder = (self.root / prefix).parent
        if folder.is_dir():
            for entry in os.scandir(folder):
                rel = Path(entry.path).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    if entry.is_dir():
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        Path(entry.path).unlink(missing_ok=True)

    def uri_of(self, key: str) -> str:
        return str(self._path(key, prefix=True)) if key else str(self.root)

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), self.root.as_posix()


class RunWriter:
    """Writes one run's files under ``<kind>/<run_id>/`` and commits it with :meth:`commit`.

    As a context manager, an exception inside the block leaves the run uncommitted (invisible to
    readers; the next attempt deletes what it wrote). Picklable, so workers can write into the run.
    """

    def __init__(self, store: Store, kind: str, run_id: str, committed: dict[str, Any] | None = None) -> None:
        self.store = store
        self.kind = kind
        self.run_id = run_id
        self.prefix = store.run_prefix(kind, run_id)
        self.manifest: dict[str, Any] | None = committed

    @property
    def already_committed(self) -> bool:
        return self.manifest is not None

    @property
    def uri(self) -> str:
        """Where the run lives (absolute path or s3:// URI of its folder)."""
        return self.store.uri_of(self.prefix)

    def key(self, relkey: str) -> str:
        check_key(relkey)
        if relkey == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by commit() only")
        return f"{self.prefix}/{relkey}"

    def _writable(self) -> None:
        if self.manifest is not None:
            raise RuntimeError(f"run {self.kind}/{self.run_id} is committed; it cannot be changed")

    def put_bytes(self, relkey: str, data: bytes) -> str:
        """Write bytes; returns the full store key."""
        self._writable()
        key = self.key(relkey)
        self.store.put_bytes(key, data)
        return key

    def put_file(self, relkey: str, path: str | os.PathLike[str]) -> str:
        self._writable()
        key = self.key(relkey)
        self.store.put_file(key, path)
        return key

    def put_json(self, relkey: str, value: Any) -> str:
        return self.put_bytes(relkey, json.dumps(value, indent=2, default=_json_default).encode())

    def put_png(self, relkey: str, image: np.ndarray, compress_level: int = 6) -> str:
        """Write a uint8 (H, W, 3) RGB or (H, W) grey image as PNG (``compress_level`` 0-9: bulk
        writers such as the atlas use 1, several times faster for files a few % larger)."""
        from PIL import Image

        image = np.asarray(image)
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ValueError(f"put_png needs uint8 (H, W, 3) or (H, W), got {image.dtype} {image.shape}")
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=compress_level)
        return self.put_bytes(relkey, buf.getvalue())

    def write_table(
        self, relkey: str, table: pa.Table, schema: pa.Schema, *, row_group_size: int | None = None
    ) -> str:
        """Write ``table`` as Parquet with exactly ``schema`` (columns reordered and safely cast to
        it; missing or extra columns, unsafe casts and nulls in non-nullable fields are errors)."""
        self._writable()
        table = conform(table, schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        return self.put_bytes(relkey, buf.getvalue())

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` (the commit marker) with status, commit time, code version and the
        list of files in the run; returns what was written."""
        self._writable()
        files = [
            {"key": o.key[len(self.prefix) + 1 :], "bytes": o.size}
            for o in self.store.list_objects(self.prefix + "/")
            if o.key != f"{self.prefix}/{MANIFEST}"
        ]
        full = {
            "name": None,
            **manifest,
            "kind": self.kind,
            "run_id": self.run_id,
            "status": "committed",
            "committed_at": _iso(datetime.now(timezone.utc)),
            "code_version": code_version(),
            "files": files,
        }
        # Round-trip through JSON so the returned dict is exactly what readers will see.
        data = json.dumps(full, indent=2, default=_json_default).encode()
        self.store.put_bytes(f"{self.prefix}/{MANIFEST}", data)
        self.manifest = json.loads(data)
        log.info("committed %s/%s (%d files) at %s", self.kind, self.run_id, len(files), self.uri)
        return self.manifest

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and not self.already_committed:
            first_line = (str(exc).splitlines() or [""])[0]
            log.warning(
                "run %s/%s failed before commit (%s: %s); not committed",
                self.kind,
                self.run_id,
                type(exc).__name__,
                first_line,
            )


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, order and types, or ValueError saying why not."""
    missing = [n for n in schema.names if n not in table.column_names]
    extra = [n for n in table.column_names if n not in schema.names]
    if missing or extra:
        raise ValueError(f"table does not match its schema: missing columns {missing}, extra columns {extra}")
    columns = []
    for field in schema:
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise ValueError(f"column {field.name!r} has {column.null_count} nulls but is not nullable")
        try:
            columns.append(column.cast(field.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(
                f"column {field.name!r}: cannot cast {column.type} to {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=schema)


def read_uri_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The bytes of one file given by a path, file:// or s3:// URI (e.g. a model checkpoint)."""
    store, key = store_for_file(uri, endpoint_url)
    return store.get_bytes(key)


def store_for_file(uri: str, endpoint_url: str | None = None) -> tuple[Store, str]:
    """The store holding the file ``uri`` names, and its key there."""
    loc = parse_uri(uri)
    parent, name = loc.parent_and_name()
    return Store.from_uri(str(parent), endpoint_url), name


def __getattr__(name: str) -> Any:
    # ``from jobs.store import S3Store`` works without importing boto3 for local-only users.
    if name == "S3Store":
        from jobs.store_s3 import S3Store

        return S3Store
    raise AttributeError(name)
