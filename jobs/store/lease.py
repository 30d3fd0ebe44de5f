"""A run's lease: one writer at a time per run, on any backend.

The lease is an object beside the run's folder, ``<kind>/<run_id>.lease``, created with the store's
atomic create-if-absent (local: a hard link that fails if the name exists; S3: a PUT with
``If-None-Match: *``), renewed by its holder every ``ttl_s / 3`` seconds with a compare-and-swap
on its version (local: under flock; S3: ``If-Match`` on the ETag), and deleted on commit or
failure. Another writer finds it and waits or stops with a line naming the holder; it takes the
lease over only when the lease is stale: not renewed for ``ttl_s`` by the holder's clock, or held
by a process of this host that no longer exists. A takeover is itself a compare-and-swap, so two
writers never both win, and a holder that lost its lease finds out at its next renewal and never
commits.

The holder's clock stamps the lease; machines whose clocks differ by more than ``ttl_s`` (default
120 s) could see a live lease as stale.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from jobs.store.base import MissingKeyError, Store, StoreError, iso, parse_iso

log = logging.getLogger(__name__)

TTL_ENV = "ZFATLAS_LEASE_TTL_S"
DEFAULT_TTL_S = 120.0


def default_ttl() -> float:
    """``ZFATLAS_LEASE_TTL_S`` or 120 s."""
    try:
        return max(1.0, float(os.environ.get(TTL_ENV, DEFAULT_TTL_S)))
    except ValueError:
        return DEFAULT_TTL_S


class RunBusyError(StoreError):
    """Another live writer holds the run's lease."""

    def __init__(self, message: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLostError(StoreError):
    """This writer's lease was taken over (it was not renewed in time): the run is another's now."""


def describe(holder: dict[str, Any] | None) -> str:
    """Who holds a lease, in words: ``pid 4242 on host node-1 (Ray job raysubmit_x), since ...``."""
    if not holder:
        return "an unreadable lease"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("ray_job_id"):
        text += f" (Ray job {holder['ray_job_id']})"
    if holder.get("acquired_at"):
        text += f", since {holder['acquired_at']}"
    return text


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _pid_gone(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


class Lease:
    """A held lease (see the module docstring); :meth:`acquire` makes one."""

    def __init__(self, store: Store, key: str, holder: dict[str, Any], version: str, ttl_s: float) -> None:
        self.store = store
        self.key = key
        self.holder = holder
        self.version = version
        self.ttl_s = ttl_s
        self.lost = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _payload(holder: dict[str, Any]) -> bytes:
        return json.dumps({**holder, "renewed_at": iso(_now())}, sort_keys=True).encode()

    @classmethod
    def try_acquire(
        cls, store: Store, key: str, *, ttl_s: float | None = None, info: dict[str, Any] | None = None
    ) -> Lease | dict[str, Any] | None:
        """The lease if it was free or stale; else what the live holder wrote (None if unreadable
        and not yet stale)."""
        ttl = ttl_s or default_ttl()
        holder = {
            **(info or {}), "token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "acquired_at": iso(_now()), "ttl_s": ttl,
        }
        for _ in range(10):
            data = cls._payload(holder)
            version = store.create_exclusive(key, data)
            if version is not None:
                return cls(store, key, holder, version, ttl)
            try:
                current, current_version = store.get_versioned(key)
            except MissingKeyError:
                continue  # released meanwhile: try again
            other = _parse(current)
            if not _stale(other, ttl):
                return other
            version = store.replace_if(key, data, current_version)
            if version is not None:
                log.warning("took over the stale lease of %s at %s (held by %s)", key, store.uri_of(key),
                            describe(other))
                return cls(store, key, holder, version, ttl)
        raise StoreError(f"the lease {store.uri_of(key)} keeps changing; try again")

    def renew(self) -> None:
        """Prove the lease is still ours and push its expiry; :class:`LeaseLostError` if not."""
        with self._lock:
            if self.lost:
                raise LeaseLostError(self._lost_message())
            version = self.store.replace_if(self.key, self._payload(self.holder), self.version)
            if version is None:
                self.lost = True
                raise LeaseLostError(self._lost_message())
            self.version = version

    def _lost_message(self) -> str:
        try:
            current = _parse(self.store.get_versioned(self.key)[0])
            now = f"it is held by {describe(current)}"
        except MissingKeyError:
            now = "it was removed"
        return (f"lost the lease {self.store.uri_of(self.key)} (not renewed within {self.ttl_s:.0f} s); "
                f"{now}, so this attempt does not commit")

    def keep_renewed(self) -> None:
        """Renew every ``ttl_s / 3`` seconds in a daemon thread until :meth:`release`."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    self.renew()
                except LeaseLostError as exc:
                    log.error("%s", exc)
                    return
                except Exception as exc:  # a store hiccup: try again at the next beat
                    log.warning("could not renew the lease %s: %s", self.key, exc)

        self._thread = threading.Thread(target=loop, name=f"lease-{self.key}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with self._lock:
            if not self.lost:
                try:
                    self.store.delete_if(self.key, self.version)
                except StoreError as exc:  # it expires on its own
                    log.warning("could not remove the lease %s: %s", self.key, exc)
                self.lost = True  # no longer held either way


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _stale(holder: dict[str, Any] | None, ttl_s: float) -> bool:
    """Whether a lease may be taken over: unreadable, not renewed for its ttl (or ours, whichever
    is longer), or its holder was a process of this host that is gone."""
    if holder is None:
        return True  # half-written by a crashed holder (a lease is tiny; anything else is not ours)
    try:
        renewed = parse_iso(str(holder["renewed_at"]))
        ttl = max(float(holder.get("ttl_s") or 0), ttl_s)
    except (KeyError, ValueError, TypeError):
        return True
    if holder.get("host") == socket.gethostname() and _pid_gone(holder.get("pid")):
        return True
    return (_now() - renewed).total_seconds() > ttl
