"""A pyarrow filesystem wrapper that counts what is read through it: how the query layer's claim
"a one-channel query does not download the whole table" is measured (tests, benchmarks), on a
local folder and on S3 alike (every read call on S3 is one ranged GET)."""

from __future__ import annotations

import threading
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class CountingFileSystem(pafs.FileSystemHandler):
    """A pyarrow filesystem wrapper that counts the bytes and read calls of files opened through
    it (wrap with ``pyarrow.fs.PyFileSystem``). Used to show what a query really downloads."""

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner
        self.bytes_read = 0
        self.reads = 0
        self.opened = 0
        self._lock = threading.Lock()

    def count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.reads += 1

    def get_type_name(self) -> str:
        return f"counting+{self.inner.type_name}"

    def equals(self, other: Any) -> bool:
        return isinstance(other, CountingFileSystem) and other.inner.equals(self.inner)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self.inner.get_file_info(selector)

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def open_input_file(self, path: str) -> pa.PythonFile:
        with self._lock:
            self.opened += 1
        return pa.PythonFile(_CountingReader(self.inner.open_input_file(path), self), mode="r")

    def open_input_stream(self, path: str) -> pa.PythonFile:
        with self._lock:
            self.opened += 1
        return pa.PythonFile(_CountingReader(self.inner.open_input_file(path), self), mode="r")

    def _read_only(self, *_: Any) -> None:
        raise OSError("CountingFileSystem is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


class _CountingReader:
    """A file object over a pyarrow NativeFile that reports every read to its filesystem."""

    def __init__(self, raw: pa.NativeFile, counter: CountingFileSystem) -> None:
        self.raw = raw
        self.counter = counter
        self.closed = False

    def read(self, nbytes: int = -1) -> bytes:
        data = self.raw.read(None if nbytes is None or nbytes < 0 else nbytes)
        self.counter.count(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def size(self) -> int:
        return self.raw.size()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True
        self.raw.close()
