"""Reading tar archives front to back once, as WebDataset shards are read: no index, no seeking
back, so a shard on S3 is one sequential stream of large reads and never a request per member.

:class:`TarWalker` yields the regular members of an archive with where their data lies; it reads
a member's bytes only when asked and skips the others. An archive that ends early (a truncated
upload, a partial copy) is not an error: the walk stops and says where and why in ``problem``,
and every member before the cut is still there. Plain ustar, GNU long names and pax ``path``
records are understood, which covers what GNU tar, Python's tarfile and the webdataset tools
write.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_LONG_META = 1 << 20  # a long name or pax header larger than this is not one


class Readable(Protocol):
    def read(self, size: int) -> bytes: ...


@dataclass(frozen=True)
class Member:
    """A regular file in the archive: its name, where its data starts and how long it is;
    ``complete`` is False when the archive ends before the member's data does."""

    name: str
    offset: int
    size: int
    complete: bool = True


class TarWalker:
    """The regular members of a tar stream of ``total_size`` bytes, in archive order.

    Iterate to get each :class:`Member`; call :meth:`read_data` before the next step to get its
    bytes (otherwise they are skipped, by ``seek`` when the stream has one). After the walk,
    ``problem`` is "" for an archive that ended properly (then ``end`` is where its end-of-archive
    marker starts), else why it stopped early.
    """

    def __init__(self, stream: Readable, total_size: int, *, seekable: bool = False) -> None:
        self.stream, self.total_size, self.seekable = stream, total_size, seekable
        self.pos = 0
        self.problem = ""
        self.end = -1  # where the end-of-archive marker starts, once reached
        self._current: Member | None = None
        self._consumed = False

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left > 0:
            chunk = self.stream.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self.pos += len(data)
        return data

    def _skip(self, size: int) -> bool:
        """Move ``size`` bytes forward; False when the archive ends first."""
        if size <= 0:
            return True
        if self.seekable:
            target = min(self.pos + size, self.total_size)
            self.stream.seek(target)  # type: ignore[attr-defined]
            moved = target - self.pos
            self.pos = target
            return moved == size
        while size > 0:
            got = len(self._read(min(size, 1 << 20)))
            if not got:
                return False
            size -= got
        return True

    def read_data(self, member: Member) -> bytes:
        """The data of the member just yielded (short if the archive is cut inside it)."""
        if member is not self._current or self._consumed:
            raise RuntimeError("read_data is only for the member just yielded, once")
        self._consumed = True
        return self._read(member.size)

    def _meta(self, size: int, what: str) -> bytes | None:
        padded = -(-size // BLOCK) * BLOCK
        if size > _LONG_META:
            self.problem = f"{what} of {size} bytes at byte {self.pos}: not a tar archive"
            return None
        data = self._read(padded)
        if len(data) < padded:
            self.problem = f"truncated inside a {what} at byte {self.pos}"
            return None
        return data[:size]

    def __iter__(self) -> Iterator[Member]:
        name: str | None = None  # from a GNU long-name or pax header, for the next member
        while True:
            start = self.pos
            header = self._read(BLOCK)
            if not header:
                self.problem = f"ends at byte {start} without the end-of-archive marker (truncated?)"
                return
            if len(header) < BLOCK:
                self.problem = f"truncated inside a header at byte {start}"
                return
            if header == _ZERO:
                self.end = start
                return
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                self.problem = f"bad header at byte {start}: {exc}"
                return
            padded = -(-info.size // BLOCK) * BLOCK
            if info.type == tarfile.GNUTYPE_LONGNAME:
                data = self._meta(info.size, "long name")
                if data is None:
                    return
                name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
                continue
            if info.type == tarfile.XHDTYPE:
                data = self._meta(info.size, "pax header")
                if data is None:
                    return
                name = _pax_path(data) or name
                continue
            if info.type in _REGULAR:
                member = Member(name or info.name, self.pos, info.size,
                                self.pos + info.size <= self.total_size)
                name = None
                self._current, self._consumed = member, False
                yield member
                left = padded - (member.size if self._consumed else 0)
                self._current = None
            else:  # directories, links, global pax headers, ...: nothing to read
                name = None
                left = padded
            if not self._skip(left):
                if self.problem == "":
                    self.problem = f"truncated at byte {self.pos} (the data of a member is cut)"
                return


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header ("<length> path=<value>\\n" records)."""
    pos, path = 0, None
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path
