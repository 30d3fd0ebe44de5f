"""The local-folder backend of :class:`jobs.store.base.Store`.

Links are followed only while they stay inside the store root: a key that is, or lies under, a
symbolic link whose real path is outside the root is refused by every read, never listed, and never
written through (a link committed inside a run could otherwise serve ``/etc/passwd`` as a PNG).
The pyarrow filesystem it hands to readers (:meth:`LocalStore.arrow_filesystem`) keeps the same
rule. Files are written with the permissions the umask gives (``0666 & ~umask``), like any other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
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

log = logging.getLogger(__name__)


class LinkOutsideStoreError(MissingKeyError):
    """The key is a symbolic link, or lies under one, whose real path is outside the store root:
    it is not followed (to a reader, the key does not exist)."""


class StoreNotFoundError(StoreError):
    """The store's folder does not exist (a typo, or nothing was ever written there)."""


def _within(path: str | os.PathLike[str], real_root: str) -> bool:
    """Whether ``path``, every link in it followed, is ``real_root`` or inside it."""
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _new_file(folder: Path, name: str) -> tuple[int, str]:
    """A new temp file beside ``name`` in ``folder``, opened for writing, created with mode 0666
    so the umask decides its permissions (``tempfile.mkstemp`` would make it 0600 whatever the
    umask, and the rename would keep that)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file in {folder}")


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class LocalStore(Store):
    """A folder on the local filesystem (created on first write)."""

    machine_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # Absolute, so a store pickled to a worker process with another cwd means the same folder.
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str, *, prefix: bool = False) -> Path:
        return self.root / check_key(key, prefix=prefix)

    @property
    def _real_root(self) -> str:
        # Resolved each time: the root may be a link itself, or only come into existence later.
        return os.path.realpath(self.root)

    def _inside(self, path: str | os.PathLike[str]) -> bool:
        return _within(path, self._real_root)

    def _readable(self, key: str) -> Path:
        """The path of ``key``, or :class:`LinkOutsideStoreError` if it leads out of the root."""
        path = self._path(key)
        if not self._inside(path):
            log.warning("not following %s: a link to %s, outside the store", path, os.path.realpath(path))
            raise LinkOutsideStoreError(
                f"key {key!r} in {self.root} is a link out of the store root; such links are not followed"
            )
        return path

    def check(self) -> None:
        """For jobs that write: the folder exists (created if need be) and is writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use {self.root} as a store: {exc.strerror or exc}") from None
        if not os.access(self.root, os.W_OK):
            raise StoreAccessError(f"store folder {self.root} is not writable")

    def check_readable(self) -> None:
        """For readers (``zfatlas serve``, queries): the folder exists and can be read. Nothing is
        created and write access is not needed, so a read-only store is served as it is."""
        if not self.root.exists():
            raise StoreNotFoundError(f"no store at {self.root}: the folder does not exist")
        if not self.root.is_dir():
            raise StoreError(f"cannot use {self.root} as a store: it is not a folder")
        if not os.access(self.root, os.R_OK | os.X_OK):
            raise StoreAccessError(f"store folder {self.root} is not readable")

    def put_bytes(self, key: str, data: bytes, *, atomic: bool = True) -> None:
        self._write(self._path(key), lambda f: f.write(data), atomic)

    def put_file(self, key: str, path: str | os.PathLike[str], *, atomic: bool = True) -> None:
        with open(path, "rb") as src:
            self._write(self._path(key), lambda f: shutil.copyfileobj(src, f, 1 << 20), atomic)

    def move_file(self, key: str, path: str | os.PathLike[str], *, atomic: bool = True) -> None:
        target = self._path(key)
        self._folder_for(target)
        try:
            # One rename, atomic whatever ``atomic`` says; a link at the target is replaced itself.
            os.replace(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            super().move_file(key, path, atomic=atomic)  # another file system: copied

    def _folder_for(self, target: Path) -> None:
        # Before creating any folder: one under a link out of the root would be created out there.
        if not self._inside(target.parent):
            raise StoreError(f"cannot write {target}: its folder is a link out of the store root {self.root}")
        target.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, target: Path, write: Any, atomic: bool) -> None:
        self._folder_for(target)
        if not atomic:
            # Straight into place; a link at the target is replaced, never written through.
            if target.is_symlink():
                target.unlink()
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
            try:
                with os.fdopen(os.open(target, flags, 0o666), "wb") as f:
                    write(f)
            except OSError:
                target.unlink(missing_ok=True)  # no half file left behind (a full disk, say)
                raise
            return
        fd, tmp = _new_file(target.parent, target.name)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)  # replaces a link at the target itself, never writes through it
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- conditional writes: the version is the content's hash; changes happen under flock ---

    def create_exclusive(self, key: str, data: bytes) -> str | None:
        target = self._path(key)
        self._folder_for(target)
        fd, tmp = _new_file(target.parent, target.name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, target)  # atomic, and fails if anything (a link too) is there
            except FileExistsError:
                return None
        finally:
            Path(tmp).unlink(missing_ok=True)
        return _version(data)

    @contextmanager
    def _locked(self, key: str, exclusive: bool) -> Iterator[int | None]:
        """The file of ``key`` open and flock-ed (None if there is none). The lock is taken on the
        file that is still linked at the path, not on one deleted while waiting for the lock."""
        path = self._readable(key)
        for _ in range(100):
            try:
                fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                yield None
                return
            except OSError as exc:
                if exc.errno == errno.ELOOP:  # a link where a lease should be: not ours to follow
                    raise StoreError(f"{path} is a link; refusing to use it as a lease") from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                try:
                    linked = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    linked = False
                if linked:
                    yield fd
                    return
            finally:
                os.close(fd)  # releases the lock
        raise StoreError(f"{path} keeps changing under its lock")

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        with self._locked(key, exclusive=False) as fd:
            if fd is None:
                raise MissingKeyError(f"no such key {key!r} in {self.root}")
            data = _read_all(fd)
        return data, _version(data)

    def replace_if(self, key: str, data: bytes, version: str) -> str | None:
        with self._locked(key, exclusive=True) as fd:
            if fd is None or _version(_read_all(fd)) != version:
                return None
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        return _version(data)

    def delete_if(self, key: str, version: str) -> bool:
        with self._locked(key, exclusive=True) as fd:
            if fd is None or _version(_read_all(fd)) != version:
                return False
            self._path(key).unlink()
        return True

    def get_bytes(self, key: str) -> bytes:
        path = self._readable(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingKeyError(f"no such key {key!r} in {self.root}") from None

    def get_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = self._readable(key)
        if not src.is_file():
            raise MissingKeyError(f"no such key {key!r} in {self.root}")
        shutil.copyfile(src, path)

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return path.is_file() and self._inside(path)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        check_key(prefix, prefix=True)
        # Walk only the folder the prefix points into, then filter by the string prefix.
        folder = self.root / prefix.rpartition("/")[0] if prefix else self.root
        real_root = self._real_root
        if not folder.is_dir() or not _within(folder, real_root):
            return []
        out = []
        # os.walk does not descend into linked folders; linked files are kept if they stay inside.
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    continue
                full = Path(dirpath, name)
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    info = os.lstat(full)
                    if stat.S_ISLNK(info.st_mode):
                        if not _within(full, real_root):
                            log.warning("not listing %s: a link out of the store %s", full, self.root)
                            continue
                        info = os.stat(full)
                except OSError:  # removed meanwhile, or a dangling link
                    continue
                if stat.S_ISREG(info.st_mode):
                    out.append(ObjectInfo(key, info.st_size))
        return sorted(out, key=lambda o: o.key)

    def list_dirs(self, prefix: str = "") -> list[str]:
        if prefix and not prefix.endswith("/"):
            raise ValueError(f"list_dirs needs a folder prefix ending in '/', got {prefix!r}")
        folder = self._path(prefix, prefix=True)
        real_root = self._real_root
        if not folder.is_dir() or not _within(folder, real_root):
            return []
        return sorted(
            e.name
            for e in os.scandir(folder)
            if e.is_dir()
            and not e.name.startswith(".")
            and (not e.is_symlink() or _within(e.path, real_root))
        )

    def delete_prefix(self, prefix: str) -> None:
        if not check_key(prefix, prefix=True):
            raise ValueError("refusing to delete the whole store (empty prefix)")
        where = self.root / prefix.rpartition("/")[0]
        if where.exists() and not self._inside(where):
            raise StoreError(f"refusing to delete {prefix!r}: it leads out of the store root {self.root}")
        if prefix.endswith("/"):
            shutil.rmtree(self._path(prefix, prefix=True), ignore_errors=True)
            return
        folder = (self.root / prefix).parent
        if folder.is_dir():
            for entry in os.scandir(folder):
                rel = Path(entry.path).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    if entry.is_dir(follow_symlinks=False):  # a link is removed, not what it points to
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        Path(entry.path).unlink(missing_ok=True)

    def uri_of(self, key: str) -> str:
        return str(self._path(key, prefix=True)) if key else str(self.root)

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The local filesystem, through a wrapper that keeps the store's rule on links (readers
        such as the API's image streaming open files through it); reads themselves stay native."""
        return pafs.PyFileSystem(RootedLocalFS(self.root)), self.root.as_posix()


class RootedLocalFS(pafs.FileSystemHandler):
    """pyarrow's local filesystem, except that a path whose real path is outside ``root`` does not
    exist: not found by ``get_file_info``, left out of listings, refused by every open, and never
    written through. Wrap with ``pyarrow.fs.PyFileSystem``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.inner = pafs.LocalFileSystem()

    def _inside(self, path: str) -> bool:
        return _within(path, os.path.realpath(self.root))

    def _check(self, path: str) -> str:
        if not self._inside(path):
            raise FileNotFoundError(f"{path}: a link out of the store root {self.root} (not followed)")
        return path

    def get_type_name(self) -> str:
        return "zfatlas-local"

    def equals(self, other: Any) -> bool:
        return self == getattr(other, "handler", other)

    # pyarrow compares two PyFileSystems by their handlers' ==.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, RootedLocalFS) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = self.inner.get_file_info(paths)
        real_root = os.path.realpath(self.root)
        return [
            i if _within(i.path, real_root) else pafs.FileInfo(i.path, pafs.FileType.NotFound) for i in infos
        ]

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        if not self._inside(selector.base_dir):
            if selector.allow_not_found:
                return []
            raise FileNotFoundError(f"{selector.base_dir}: a link out of the store root {self.root}")
        real_root = os.path.realpath(self.root)
        return [i for i in self.inner.get_file_info(selector) if _within(i.path, real_root)]

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.inner.open_input_file(self._check(path))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.inner.open_input_stream(self._check(path))

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.inner.open_output_stream(self._check(path), metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self.inner.open_append_stream(self._check(path), metadata=metadata)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.inner.create_dir(self._check(path), recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.inner.delete_dir(self._check(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.inner.delete_dir_contents(self._check(path), missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the filesystem root")

    def delete_file(self, path: str) -> None:
        self.inner.delete_file(self._check(path))

    def move(self, src: str, dest: str) -> None:
        self.inner.move(self._check(src), self._check(dest))

    def copy_file(self, src: str, dest: str) -> None:
        self.inner.copy_file(self._check(src), self._check(dest))
