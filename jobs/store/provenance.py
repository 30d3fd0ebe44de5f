"""Provenance: which code produced a run, and fingerprints of the inputs it read."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from importlib import metadata
from pathlib import Path


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
    repo = Path(__file__).resolve().parents[2]
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
