"""A lease (a lock with an expiry) kept next to the output: OUT/_framescribe/lease.json.

acquire: write it when it is absent or expired (owner id, expiry); the holder renews it while it
works (a heartbeat thread) and marks it expired when done. A run that crashed holds nothing once
its lease expires, so the next scheduled run takes over.

How exclusive acquisition is, by storage:

* local or mounted filesystem: read-check-write happens under flock(2) on `lease.json.lock`, and
  the new lease replaces the old by rename: exact.
* s3://: conditional writes. A new lease is written with `If-None-Match: *` (only if absent), a
  takeover / renewal / release with `If-Match: <ETag that was read>` (only if unchanged). AWS S3
  honours both (since 2024), as do moto and recent MinIO: then exactly one contender wins. A server
  that ignores the headers degrades to last-writer-wins; the read-back after `settle_s` still
  catches a loser unless both PUTs land within that window.
* any other fsspec backend: write, wait `settle_s`, read back, keep it only if it is ours
  (the same tiny race).

If that race is ever lost, two runs label the same new videos at once. Nothing is corrupted:
parts are committed atomically and resume keys are deterministic, so the next run sees every
(video, prompt) as done; rows written twice are removed by the compaction every run does at its
start and end (`pipeline.output.compact_duplicates`: one row per video_id, prompt_id, labeling_hash). Expiry uses the writers' wall clocks: keep the TTL far above the
clock skew between machines.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

from pipeline.output import STATE_DIR
from pipeline.storage import get_fs, join

LEASE_FILE = "lease.json"
_KEEP = object()  # an update function's "leave it as it is"


@dataclass
class LeaseInfo:
    owner: str
    expires_at: float          # epoch seconds
    acquired_at: float
    renewed_at: float
    host: str = ""
    pid: int = 0
    released: bool = False

    def expired(self, now: float) -> bool:
        return self.released or self.expires_at <= now

    @property
    def expires_iso(self) -> str:
        return datetime.fromtimestamp(self.expires_at, timezone.utc).isoformat(timespec="seconds")

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "expires_at_iso": self.expires_iso}, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Optional["LeaseInfo"]:
        try:
            d = json.loads(data)
            return cls(owner=str(d["owner"]), expires_at=float(d["expires_at"]),
                       acquired_at=float(d.get("acquired_at", 0)), renewed_at=float(d.get("renewed_at", 0)),
                       host=str(d.get("host", "")), pid=int(d.get("pid", 0)), released=bool(d.get("released")))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable (e.g. a torn write on a non-atomic store): treated as expired


class Lease:
    def __init__(self, output: str, *, ttl_s: float = 600.0, owner: Optional[str] = None,
                 s3_endpoint: Optional[str] = None, anon: bool = False, settle_s: float = 0.5,
                 clock: Callable[[], float] = time.time):
        if ttl_s <= 0:
            raise ValueError("lease ttl must be > 0")
        self.fs, root = get_fs(output, s3_endpoint=s3_endpoint, anon=anon)
        self.dir = join(root, STATE_DIR)
        self.path = join(self.dir, LEASE_FILE)
        self.ttl_s, self.settle_s, self.clock = ttl_s, settle_s, clock
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.holder: Optional[LeaseInfo] = None  # the current lease as last seen (another run's when refused)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.kind = "local" if {"file", "local"} & set(protocols) else "s3" if {"s3", "s3a"} & set(protocols) else "other"
        self.fs.makedirs(self.dir, exist_ok=True)

    # --- the three operations ---
    def acquire(self) -> bool:
        """Take the lease if it is free or expired; False (and `holder` set) while another run holds it."""
        now = self.clock()

        def take(cur: Optional[LeaseInfo]):
            if cur is not None and cur.owner != self.owner and not cur.expired(now):
                return _KEEP
            return LeaseInfo(owner=self.owner, expires_at=now + self.ttl_s, acquired_at=now, renewed_at=now,
                             host=socket.gethostname(), pid=os.getpid())

        return self._update(take)

    def renew(self) -> bool:
        """Push the expiry out by ttl; False when the lease is no longer ours (expired and taken over)."""
        now = self.clock()

        def extend(cur: Optional[LeaseInfo]):
            if cur is None or cur.owner != self.owner or cur.released:
                return _KEEP
            return LeaseInfo(**{**asdict(cur), "expires_at": now + self.ttl_s, "renewed_at": now})

        return self._update(extend)

    def release(self) -> bool:
        """Mark our lease expired (kept as a record of the last holder); no-op when it is not ours."""
        now = self.clock()

        def expire(cur: Optional[LeaseInfo]):
            if cur is None or cur.owner != self.owner:
                return _KEEP
            return LeaseInfo(**{**asdict(cur), "expires_at": now, "renewed_at": now, "released": True})

        return self._update(expire)

    def read(self) -> Optional[LeaseInfo]:
        return self._read()[0]

    # --- storage ---
    def _read(self) -> tuple[Optional[LeaseInfo], Optional[str], bool]:
        """(lease or None, ETag on s3, whether the object exists)."""
        if self.kind == "s3":
            self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path).get("ETag") if self.kind == "s3" else None
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None, False
        return LeaseInfo.from_json(data), etag, True

    def _update(self, fn) -> bool:
        """Apply fn(current) → new lease | _KEEP atomically (as far as the store allows); True if written."""
        if self.kind == "local":
            with self._flock():
                cur, _, _ = self._read()
                self.holder = cur
                new = fn(cur)
                if new is _KEEP:
                    return False
                tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "wb") as f:
                    f.write(new.to_json())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
                self.holder = new
                return True

        cur, etag, exists = self._read()
        self.holder = cur
        new = fn(cur)
        if new is _KEEP:
            return False
        try:
            if self.kind == "s3":
                if exists:
                    self.fs.pipe_file(self.path, new.to_json(), IfMatch=etag)
                else:
                    self.fs.pipe_file(self.path, new.to_json(), mode="create")
            else:
                self.fs.pipe_file(self.path, new.to_json())
        except OSError:
            # precondition failed (someone else wrote first) or a real error: decide by what is there now
            self.holder = self._read()[0]
            if self.holder is not None and self.holder.owner != new.owner:
                return False
            raise
        time.sleep(self.settle_s)  # read back: catches a store that ignored the conditional headers
        self.holder = self._read()[0]
        return self.holder is not None and self.holder.owner == new.owner

    @contextmanager
    def _flock(self):
        import fcntl

        fd = os.open(self.path + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class Heartbeat(threading.Thread):
    """Renews a held lease every ttl/3 until stopped; `lost` is set when it was taken over."""

    def __init__(self, lease: Lease, *, interval_s: Optional[float] = None, on_lost: Callable[[], None] | None = None):
        super().__init__(daemon=True, name="framescribe-lease-heartbeat")
        self.lease, self.interval_s = lease, interval_s or lease.ttl_s / 3
        self.on_lost = on_lost
        self.lost = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                if not self.lease.renew():
                    self.lost = True
                    if self.on_lost:
                        self.on_lost()
                    return
            except Exception:  # a transient store error: try again next beat (the TTL covers two misses)
                continue

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
