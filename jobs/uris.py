"""Store and dataset locations: a plain path, ``file://`` or ``s3://bucket/prefix``.

Specs validate locations with :func:`parse_uri` so a typo'd scheme fails at ``validate`` time, not
after a job has spent an hour computing; the store and dataset readers use the same parser so they
agree with the spec on what a location means.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# S3 bucket naming rules (the subset every S3-compatible server accepts).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SUPPORTED = "a path, file:///path or s3://bucket/prefix"


@dataclass(frozen=True)
class Location:
    """A parsed location. ``scheme`` is "file" or "s3"; for "file", ``path`` is a local path (not
    resolved); for "s3", ``bucket`` and ``path`` (the key prefix, no leading or trailing slash)."""

    scheme: str
    path: str
    bucket: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def local_path(self) -> Path:
        if self.is_s3:
            raise ValueError("not a local location")
        return Path(self.path).expanduser()

    def parent_and_name(self) -> tuple[Location, str]:
        """The containing folder and the last component (for a location naming one file)."""
        head, _, name = self.path.rstrip("/").rpartition("/")
        if not name:
            raise ValueError(f"{self} does not name a file")
        if self.is_s3:
            return Location("s3", head, self.bucket), name
        return Location("file", head or ("/" if self.path.startswith("/") else "."), None), name

    def __str__(self) -> str:
        if self.is_s3:
            return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"
        return self.path


def parse_uri(uri: str) -> Location:
    """Parse a location, raising ValueError with a readable reason for anything unsupported."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"empty location; expected {SUPPORTED}")
    uri = uri.strip()
    match = _SCHEME.match(uri)
    if not match:
        return Location("file", uri)
    scheme = match.group(1).lower()
    parts = urlsplit(uri)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names host {parts.netloc!r}; use file:///absolute/path")
        if not parts.path:
            raise ValueError(f"file URI {uri!r} has no path")
        return Location("file", unquote(parts.path))
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise ValueError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/prefix")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name")
        prefix = parts.path.strip("/")
        if any(seg in ("", ".", "..") for seg in prefix.split("/")) and prefix:
            raise ValueError(f"S3 URI {uri!r} has an empty, '.' or '..' path segment")
        return Location("s3", prefix, bucket)
    raise ValueError(f"unsupported URI scheme {scheme!r}; use {SUPPORTED}")
