"""The local-folder backend of :class:`jobs.store.base.Store`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from jobs.store.base import (
    TMP_SUFFIX,
    MissingKeyError,
    ObjectInfo,
    Store,
    StoreAccessError,
    StoreError,
    check_key,
)


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
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
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
                if name.endswith(TMP_SUFFIX):
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
