"""Runs: a job's files under ``<kind>/<run_id>/`` in a store, committed by writing
``manifest.json`` last.

Readers only list runs that have a manifest, so a job that dies mid-write leaves nothing visible.
:func:`begin_run` either reports an already committed run (the job no-ops) or takes the run's
lease (:mod:`jobs.store.lease`: one writer per run, so a second run of the same spec can never
delete or overwrite what the first is writing) and deletes an uncommitted leftover before the job
writes again. A commit checks that every object the run's manifest and tables reference exists;
a failed attempt removes its files (unless the kind resumes from them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.store.base import (
    LEASE_SUFFIX,
    MissingKeyError,
    Store,
    StoreError,
    check_key,
    iso,
    json_default,
    parse_iso,
    segment,
)
from jobs.store.encoding import parquet_bytes, png_bytes
from jobs.store.lease import Lease, RunBusyError, describe
from jobs.store.provenance import code_version

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def run_prefix(kind: str, run_id: str) -> str:
    """The folder of a run: ``<kind>/<run_id>``."""
    return f"{segment(kind, 'kind')}/{segment(run_id, 'run id')}"


def lease_key(kind: str, run_id: str) -> str:
    """Where a run's lease lives: beside its folder, ``<kind>/<run_id>.lease``."""
    return run_prefix(kind, run_id) + LEASE_SUFFIX


def begin_run(
    store: Store,
    kind: str,
    run_id: str,
    *,
    keep_leftovers: bool = False,
    wait_s: float = 0.0,
    holder: dict[str, Any] | None = None,
    ttl_s: float | None = None,
) -> RunWriter:
    """A writer for the run: ``already_committed`` if its manifest exists; otherwise the run's
    lease is taken (waiting up to ``wait_s`` for a live holder to finish, else
    :class:`RunBusyError` naming it; ``holder``: more to say about this writer, e.g. its Ray job)
    and whatever an earlier, uncommitted attempt left under its prefix is deleted, unless
    ``keep_leftovers`` (a job that resumes from them, e.g. training from its checkpoints)."""
    prefix = run_prefix(kind, run_id)
    deadline = time.monotonic() + max(0.0, wait_s)
    waited = False
    while True:
        manifest = _manifest(store, prefix)
        if manifest is not None:
            return RunWriter(store, kind, run_id, committed=manifest)
        got = Lease.try_acquire(store, lease_key(kind, run_id), ttl_s=ttl_s, info=holder)
        if isinstance(got, Lease):
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise RunBusyError(
                f"run {kind}/{run_id} is being written by {describe(got)} "
                f"(lease {store.uri_of(lease_key(kind, run_id))})"
                + ("; it did not finish in time" if waited else "; wait for it (--wait) or run again later"),
                got,
            )
        if not waited:
            log.info("run %s/%s is being written by %s; waiting up to %.0f s", kind, run_id,
                     describe(got), left)
            waited = True
        time.sleep(min(2.0, left))
    try:
        # The holder before us may have committed between our look and our lease.
        manifest = _manifest(store, prefix)
        if manifest is not None:
            got.release()
            return RunWriter(store, kind, run_id, committed=manifest)
        leftovers = [] if keep_leftovers else store.list_keys(prefix + "/")
        if leftovers:
            log.info("deleting %d files of an uncommitted attempt at %s", len(leftovers),
                     store.uri_of(prefix))
            store.delete_prefix(prefix + "/")
    except BaseException:
        got.release()
        raise
    got.keep_renewed()
    return RunWriter(store, kind, run_id, lease=got, resumable=keep_leftovers)


def _manifest(store: Store, prefix: str) -> dict[str, Any] | None:
    try:
        return store.get_json(f"{prefix}/{MANIFEST}")
    except MissingKeyError:
        return None


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
    readers) and removes what this attempt wrote, unless the run is ``resumable`` (its files are
    what the next attempt resumes from); the lease is released either way. Picklable, so workers
    can write into the run (the lease stays with the process that took it). Files of an
    uncommitted run are written without temp file and rename (nothing reads them before the
    commit), except in resumable runs, whose next attempt does read them.
    """

    def __init__(
        self,
        store: Store,
        kind: str,
        run_id: str,
        committed: dict[str, Any] | None = None,
        *,
        lease: Lease | None = None,
        resumable: bool = False,
    ) -> None:
        self.store = store
        self.kind = kind
        self.run_id = run_id
        self.prefix = run_prefix(kind, run_id)
        self.manifest: dict[str, Any] | None = committed
        self.lease = lease
        self.resumable = resumable
        self.removed_after_failure: bool | None = None  # set by __exit__ when the block raised

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "lease": None}

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
        self.store.put_bytes(key, data, atomic=self.resumable)
        return key

    def put_file(self, relkey: str, path: str | os.PathLike[str]) -> str:
        self._writable()
        key = self.key(relkey)
        self.store.put_file(key, path, atomic=self.resumable)
        return key

    def move_file(self, relkey: str, path: str | os.PathLike[str]) -> str:
        """:meth:`put_file` of a local file nobody needs afterwards (a rename on the same disk)."""
        self._writable()
        key = self.key(relkey)
        self.store.move_file(key, path, atomic=self.resumable)
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
        list of files in the run; returns what was written. Refused (:class:`StoreError`) when the
        lease was lost or an object the manifest or a table references is missing."""
        self._writable()
        if self.lease is not None:
            self.lease.renew()  # LeaseLostError: another writer owns the run now
        files = [
            {"key": o.key[len(self.prefix) + 1 :], "bytes": o.size}
            for o in self.store.list_objects(self.prefix + "/")
            if o.key != f"{self.prefix}/{MANIFEST}"
        ]
        missing = sorted(self.references(manifest, {f["key"] for f in files}) - {f["key"] for f in files})
        if missing:
            raise StoreError(
                f"not committing {self.kind}/{self.run_id}: {len(missing)} objects its manifest or tables "
                f"reference are missing, e.g. {self.store.uri_of(f'{self.prefix}/{missing[0]}')}"
            )
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
        if self.lease is not None:
            self.lease.release()
        log.info("committed %s/%s (%d files) at %s", self.kind, self.run_id, len(files), self.uri)
        return self.manifest

    def references(self, manifest: dict[str, Any], files: set[str]) -> set[str]:
        """Run-relative keys that ``manifest`` and the run's Parquet tables name: strings of the
        manifest that are keys of this run, the manifest's ``tables`` (relative keys), and the
        values of every string column called ``*_key`` of the run's tables."""
        inside = self.prefix + "/"
        refs = {s[len(inside) :] for s in _strings(manifest) if s.startswith(inside)}
        tables = manifest.get("tables")
        if isinstance(tables, dict):  # {name: key}, keys relative to the run (atlas) or full (train)
            refs |= {str(v) for v in tables.values() if not str(v).startswith(inside)}
        fs, root = self.store.arrow_filesystem()
        for relkey in sorted(f for f in files if f.endswith(".parquet")):
            path = f"{root}/{self.prefix}/{relkey}"
            schema = pq.read_schema(path, filesystem=fs)
            columns = [f.name for f in schema if f.name.endswith("_key") and pa.types.is_string(f.type)]
            if columns:
                table = pq.read_table(path, columns=columns, filesystem=fs)
                for name in columns:
                    keys = table.column(name).to_pylist()
                    refs |= {k[len(inside) :] for k in keys if k and k.startswith(inside)}
        return refs

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None or self.already_committed:
            if self.lease is not None:
                self.lease.release()
            return
        first_line = (str(exc).splitlines() or [""])[0]
        # INFO: whoever ran the job reports its failure (the CLI in one line); this is the log's.
        log.info("run %s/%s failed before commit (%s: %s); not committed", self.kind, self.run_id,
                    type(exc).__name__, first_line)
        try:
            if self.lease is not None and self.lease.lost:
                return  # another writer owns the run: its files are not ours to remove
            if self.resumable:
                log.info("the files of this attempt are kept for the next one to resume from: %s "
                            "(remove them to start over)", self.uri)
                return
            try:
                self.store.delete_prefix(self.prefix + "/")
                self.removed_after_failure = True
                log.info("removed the files of the failed attempt at %s", self.uri)
            except Exception as cleanup:  # e.g. the store went away as well
                self.removed_after_failure = False
                log.warning("could not remove the files of the failed attempt (%s); remove %s by hand",
                            cleanup, self.uri)
        finally:
            if self.lease is not None:
                self.lease.release()


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
