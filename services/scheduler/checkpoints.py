"""The newest checkpoint under a store prefix: what a schedule's ``latest:PREFIX`` means.

A nightly atlas should look at the model shipped last, without anyone editing the schedule: the
spec template names a prefix (``latest:s3://models/zfnet/`` or ``latest:/mnt/models/``) and each
fire resolves it to the most recently modified checkpoint file under it, recursively. Store writes
are atomic (a rename locally, a single PUT on S3), so a file that is listed is complete.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import pyarrow.fs as pafs

from jobs.store import StoreError, open_store

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
_EPOCH = datetime.fromtimestamp(0, timezone.utc)


class CheckpointNotFoundError(StoreError):
    """The prefix holds no checkpoint file."""


def newest_checkpoint(prefix: str, endpoint_url: str | None = None) -> str:
    """Path or ``s3://`` URI of the newest ``.pt``/``.pth``/``.ckpt`` file under ``prefix``
    (latest modification time; ties go to the last key in sort order)."""
    store = open_store(prefix, endpoint_url)
    filesystem, base = store.arrow_filesystem()
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StoreError(f"cannot list {prefix}: {exc}") from None
    candidates = []
    for info in infos:
        if info.type != pafs.FileType.File or info.base_name.startswith("."):
            continue
        if info.path.lower().endswith(CHECKPOINT_SUFFIXES):
            mtime = info.mtime or _EPOCH
            candidates.append((mtime if mtime.tzinfo else mtime.replace(tzinfo=timezone.utc), info.path))
    if not candidates:
        raise CheckpointNotFoundError(f"no checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) under {prefix}")
    _, path = max(candidates)
    key = path[len(base) :].lstrip("/")
    uri = store.uri_of(key)
    log.info("latest checkpoint under %s is %s", prefix, uri)
    return uri
