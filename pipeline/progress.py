"""What a person watching a run sees: one live line on a terminal, a progress line every few seconds
elsewhere (files, `kubectl logs`, Ray job logs); Ray's own logs and warnings go to a log file instead
(`--verbose` keeps them on the console)."""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

LINE_EVERY_S = 5.0   # progress line period when stderr is not a terminal
POLL_S = 1.0
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")


class ProgressCounter:
    """Ray actor: rows finished so far, by status (map tasks add to it, the driver polls it)."""

    def __init__(self):
        self.ok = 0
        self.error = 0

    def add(self, ok: int, error: int) -> None:
        self.ok += ok
        self.error += error

    def get(self) -> tuple[int, int]:
        return self.ok, self.error


def count_rows(batch: pa.Table, *, counter) -> pa.Table:
    """Ray Data map_batches fn after the model: report this batch's ok / error rows (fire and forget)."""
    n_ok = pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0 if batch.num_rows else 0
    counter.add.remote(n_ok, batch.num_rows - n_ok)
    return batch


@dataclass
class Snapshot:
    done: int
    total: int
    ok: int
    error: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.per_s if self.per_s > 0 else None

    def line(self, unit: str) -> str:
        eta = "?" if self.eta_s is None else _hms(self.eta_s)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{unit} {self.done}/{self.total} ({pct:.1f}%)  ok {self.ok}  error {self.error}  "
                f"{self.per_s:.2f}/s  elapsed {_hms(self.seconds)}  ETA {eta}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressDisplay:
    """Polls `read()` -> (ok, error) in a thread; a rich live line on a terminal, else a line every
    `every_s` seconds on stderr. Use as a context manager around the blocking write."""

    def __init__(self, read, total: int, unit: str = "videos", *, stream=None, every_s: float = LINE_EVERY_S,
                 live: bool | None = None):
        self.read, self.total, self.unit = read, total, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.live = self.stream.isatty() if live is None else live
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="framescribe-progress", daemon=True)
        self.last: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        try:
            ok, error = self.read()
        except Exception:  # a counter that cannot be reached must never stop the run
            ok, error = (self.last.ok, self.last.error) if self.last else (0, 0)
        self.last = Snapshot(ok + error, self.total, ok, error, time.perf_counter() - self._t0)
        return self.last

    def _loop(self) -> None:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            with Live(self.snapshot().line(self.unit), console=Console(file=self.stream),
                      refresh_per_second=4, transient=False) as live:
                while not self._stop.wait(POLL_S):
                    live.update(self.snapshot().line(self.unit))
                live.update(self.snapshot().line(self.unit))
            return
        while not self._stop.wait(self.every_s):
            print("progress: " + self.snapshot().line(self.unit), file=self.stream, flush=True)

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if not self.live:
            print("progress: " + self.snapshot().line(self.unit), file=self.stream, flush=True)


def route_ray_logs(log_path: Path, *, verbose: bool) -> logging.Handler:
    """Send Ray's driver-side loggers and Python warnings to `log_path`; unless `verbose`, take Ray's
    console handlers away (they come back with `restore_ray_logs`)."""
    import ray.data  # noqa: F401  (configures the ray.data logger; we adjust it after)

    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._framescribe_removed = []  # type: ignore[attr-defined]
    for name in (*_RAY_LOGGERS, "py.warnings"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        if not verbose:
            for h in list(logger.handlers):
                if h is not handler and not isinstance(h, logging.FileHandler):
                    logger.removeHandler(h)
                    handler._framescribe_removed.append((logger, h))  # type: ignore[attr-defined]
    if not verbose:
        logging.getLogger("py.warnings").propagate = False
        logging.captureWarnings(True)
    return handler


def restore_ray_logs(handler: logging.Handler) -> None:
    for logger, h in getattr(handler, "_framescribe_removed", []):
        logger.addHandler(h)
    for name in (*_RAY_LOGGERS, "py.warnings"):
        logging.getLogger(name).removeHandler(handler)
    logging.getLogger("py.warnings").propagate = True
    logging.captureWarnings(False)
    handler.close()
