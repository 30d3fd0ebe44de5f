"""Runs: a job's files under ``<kind>/<run_id>/`` in a store, committed by writing
``manifest.json`` last.

Readers only list runs that have a manifest, so a job that dies mid-write leaves nothing visible,
and :func:`begin_run` either reports an already committed run (the job no-ops) or deletes an
uncommitted leftover before the job writes again (never duplicates).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.store.base import MissingKeyError, Store, check_key, iso, json_default, parse_iso, segment
from jobs.store.encoding import parquet_bytes, png_bytes
from jobs.store.provenance import code_version

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def run_prefix(kind: str, run_id: str) -> str:
    """The folder of a run: ``<kind>/<run_id>``."""
    return f"{segment(kind, 'kind')}/{segment(run_id, 'run id')}"


def begin_run(store: Store, kind: str, run_id: str, *, keep_leftovers: bool = False) -> RunWriter:
    """A writer for the run: ``already_committed`` if its manifest exists; otherwise whatever an
    earlier, uncommitted attempt left under its prefix is deleted first, unless
    ``keep_leftovers`` (a job that resumes from them, e.g. training from its checkpoints)."""
    prefix = run_prefix(kind, run_id)
    try:
        manifest = store.get_json(f"{prefix}/{MANIFEST}")
    except MissingKeyError:
        manifest = None
    if manifest is not None:
        return RunWriter(store, kind, run_id, committed=manifest)
    leftovers = [] if keep_leftovers else store.list_keys(prefix + "/")
    if leftovers:
        log.info("deleting %d files of an uncommitted attempt at %s", len(leftovers), store.uri_of(prefix))
        store.delete_prefix(prefix + "/")
    return RunWriter(store, kind, run_id)


def read_manifest(store: Store, kind: str, run_id: str) -> dict[str, Any]:
    """The committed manifest; :class:`MissingKeyError` if the run is not committed."""
    prefix = run_prefix(kind, run_id)
    try:
        return store.get_json(f"{prefix}/{MANIFEST}")
    except MissingKeyError:
        raise MissingKeyError(f"no committed run {kind}/{run_id} in {store.uri_of('')}") from None


def committed_runs(
    store: Store, kind: str | None = None, since: datetime | None = None
) -> list[dict[str, Any]]:
    """Manifests of committed runs (oldest first), optionally of one kind and committed at or
    after ``since`` (naive datetimes are taken as UTC)."""
    kinds = [segment(kind, "kind")] if kind else store.list_dirs("")
    cutoff = parse_iso(iso(since)) if since else None
    runs = []
    for k in kinds:
        for run_id in store.list_dirs(f"{k}/"):
            try:
                manifest = store.get_json(f"{k}/{run_id}/{MANIFEST}")
            except MissingKeyError:
                continue  # in progress or abandoned: not a run yet
            except ValueError:
                log.warning("ignoring unreadable manifest of %s/%s", k, run_id)
                continue
            if not isinstance(manifest, dict) or manifest.get("status") != "committed":
                continue
            if cutoff and parse_iso(manifest["committed_at"]) < cutoff:
                continue
            runs.append(manifest)
    return sorted(runs, key=lambda m: m["committed_at"])


class RunWriter:
    """Writes one run's files under ``<kind>/<run_id>/`` and commits it with :meth:`commit`.

    As a context manager, an exception inside the block leaves the run uncommitted (invisible to
    readers; the next attempt deletes what it wrote). Picklable, so workers can write into the run.
    """

    def __init__(self, store: Store, kind: str, run_id: str, committed: dict[str, Any] | None = None) -> None:
        self.store = store
        self.kind = kind
        self.run_id = run_id
        self.prefix = run_prefix(kind, run_id)
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
        return self.put_bytes(relkey, json.dumps(value, indent=2, default=json_default).encode())

    def put_png(self, relkey: str, image: np.ndarray, compress_level: int = 6) -> str:
        """Write a uint8 (H, W, 3) RGB or (H, W) grey image as PNG (``compress_level`` 0-9: bulk
        writers such as the atlas use 1, several times faster for files a few % larger)."""
        return self.put_bytes(relkey, png_bytes(image, compress_level))

    def write_table(
        self, relkey: str, table: pa.Table, schema: pa.Schema, *, row_group_size: int | None = None
    ) -> str:
        """Write ``table`` as Parquet with exactly ``schema`` (see :func:`jobs.store.encoding.conform`)."""
        self._writable()
        return self.put_bytes(relkey, parquet_bytes(table, schema, row_group_size=row_group_size))

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
            "committed_at": iso(datetime.now(timezone.utc)),
            "code_version": code_version(),
            "files": files,
        }
        # Round-trip through JSON so the returned dict is exactly what readers will see.
        data = json.dumps(full, indent=2, default=json_default).encode()
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
