"""A lease (a lock with an expiry) kept next to the output: OUT/_framescribe/lease.json.

Every run that writes or compacts an output holds this lease (`hold_output_lease`): `framescribe run`,
`python -m jobs.label`, `python -m jobs.incremental` and the jobs `framescribe submit` starts.

acquire: write it when it is absent, expired, already ours (a retry of the same run: same owner id,
see `lease_owner`), or held by a process of this host that no longer exists (owner id, host, pid,
expiry); the holder renews it while it works (a heartbeat thread) and marks it released on every exit
path. A run that crashed on another machine holds nothing once its lease expires.

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
import signal
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

    def process_gone(self) -> bool:
        """The holder ran on this host and its process has exited (killed, crashed): its lease is void."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        try:  # a killed child its parent has not reaped yet is a zombie: gone too
            return open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def describe(self) -> str:
        return f"owner {self.owner} (host {self.host or '?'}, pid {self.pid or '?'}) until {self.expires_iso}"

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
            if cur is not None and cur.owner != self.owner and not cur.expired(now) and not cur.process_gone():
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


# --- one writer per output: what every run does -----------------------------------------------------

OWNER_ENV = "FRAMESCRIBE_LEASE_OWNER"  # a stable id across retries of one run (e.g. the RayJob's name)


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (and we did not wait, or waited too long)."""

    def __init__(self, holder: Optional[LeaseInfo], path: str):
        who = holder.describe() if holder is not None else "another run"
        super().__init__(f"another run holds the output's lease: {who} ({path}); wait for it with --wait-lease, "
                         "or stop that run")
        self.holder, self.path = holder, path


class LeaseLost(RuntimeError):
    """Our lease expired and another run took it over while we worked: we stopped writing."""


def lease_owner(run_id: Optional[str] = None) -> Optional[str]:
    """Owner id a retry of the same run shares: $FRAMESCRIBE_LEASE_OWNER, else run:<run_id>, else None (unique)."""
    if os.environ.get(OWNER_ENV, "").strip():
        return os.environ[OWNER_ENV].strip()
    return f"run:{run_id}" if run_id else None


@contextmanager
def hold_output_lease(output: str, *, ttl_s: float = 600.0, wait: bool = False, wait_timeout_s: Optional[float] = None,
                      owner: Optional[str] = None, s3_endpoint: Optional[str] = None, anon: bool = False,
                      log: Callable[[str], None] = print, settle_s: float = 0.5):
    """Hold the output's lease for the body: acquire (or wait), renew, release on every exit path.

    Raises LeaseHeld when another run holds it (after `wait_timeout_s` with `wait`); LeaseLost when it
    was taken over while the body ran (the main thread is interrupted then, so writing stops).
    SIGTERM (pod eviction, `ray job stop`) becomes SystemExit inside the body, so the lease is released.
    """
    lease = Lease(output, ttl_s=ttl_s, owner=owner, s3_endpoint=s3_endpoint, anon=anon, settle_s=settle_s)
    deadline = None if wait_timeout_s is None else time.monotonic() + wait_timeout_s
    while not lease.acquire():
        remaining = None if deadline is None else deadline - time.monotonic()
        if not wait or (remaining is not None and remaining <= 0):
            raise LeaseHeld(lease.holder, lease.path)
        h = lease.holder
        log(f"waiting for the output's lease: {h.describe() if h else 'another run'} ({lease.path})")
        until_expiry = (h.expires_at - time.time() + 0.5) if h else 1.0
        pause = max(0.5, min(30.0, ttl_s / 10, until_expiry))
        time.sleep(pause if remaining is None else max(0.0, min(pause, remaining)))
    log(f"lease taken: {lease.owner} until {lease.holder.expires_iso} ({lease.path})")

    main = threading.current_thread() is threading.main_thread()

    def lost() -> None:
        log(f"error: the output's lease was taken over by {lease.holder.describe() if lease.holder else 'another run'}; "
            "stopping")
        if main:  # a signal, not interrupt_main(): it also wakes a main thread blocked in a sleep or a wait
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    heartbeat = Heartbeat(lease, on_lost=lost)
    old_term = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    heartbeat.start()
    try:
        yield lease
    except KeyboardInterrupt:
        if heartbeat.lost:
            raise LeaseLost(f"the output's lease ({lease.path}) was taken over by another run while this one wrote; "
                            "stopped (committed parts stay; the next run resumes)") from None
        raise
    finally:
        heartbeat.stop()
        if main:
            signal.signal(signal.SIGTERM, old_term)
        try:
            lease.release()
        except Exception as e:  # the store is unreachable: the lease expires by itself after ttl
            log(f"warning: could not release the lease {lease.path}: {type(e).__name__}: {e}")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
