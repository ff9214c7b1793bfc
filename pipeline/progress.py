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


def report_batch(batch: pa.Table, counter) -> None:
    """Tell the counter this batch's ok / error rows (fire and forget)."""
    if counter is None or batch.num_rows == 0:
        return
    n_ok = pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0
    counter.add.remote(n_ok, batch.num_rows - n_ok)


def counting(model_cls):
    """`model_cls` that reports each labeled batch to a ProgressCounter (the `progress_counter` argument):
    counted where rows are made, not at the sink, which gathers rows before it commits a part."""

    class Counting(model_cls):
        def __init__(self, *args, progress_counter=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._progress_counter = progress_counter

        def __call__(self, batch):
            out = super().__call__(batch)
            report_batch(out, self._progress_counter)
            return out

    Counting.__name__ = Counting.__qualname__ = model_cls.__name__  # Ray names the stage after it
    return Counting


@dataclass
class Snapshot:
    done: int
    total: int
    ok: int
    error: int
    seconds: float
    rate: float | None = None  # rows/s since the first rows came out (model loading left out)

    @property
    def per_s(self) -> float:
        if self.rate is not None:
            return self.rate
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
        self._first: tuple[float, int] | None = None
        self._printed = ""

    def snapshot(self) -> Snapshot:
        try:
            ok, error = self.read()
        except Exception:  # a counter that cannot be reached must never stop the run
            ok, error = (self.last.ok, self.last.error) if self.last else (0, 0)
        now, done = time.perf_counter(), ok + error
        if done and self._first is None:
            self._first = (now, done)
        rate = None
        if self._first and now > self._first[0] and done > self._first[1]:
            rate = (done - self._first[1]) / (now - self._first[0])
        self.last = Snapshot(done, self.total, ok, error, now - self._t0, rate)
        return self.last

    def _print(self) -> None:
        line = "progress: " + self.snapshot().line(self.unit)
        if line != self._printed:
            print(line, file=self.stream, flush=True)
            self._printed = line

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
            self._print()

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if not self.live:
            self._print()


class ConsoleRoute:
    """While labeling, without --verbose: the process's stderr (fd 2: Ray's Python loggers, its C++ core
    worker lines, warnings) goes to the run's log file; `console` is the real stderr for our own lines."""

    def __init__(self, log_path: Path, *, verbose: bool):
        self.log_path, self.verbose = log_path, verbose
        self.console = sys.stderr
        self._saved_fd: int | None = None
        self._handler: logging.Handler | None = None

    def __enter__(self) -> "ConsoleRoute":
        import os

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.FileHandler(self.log_path, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("framescribe").addHandler(self._handler)
        if self.verbose:
            return self
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        self._tty = os.isatty(2)
        with open(self.log_path, "ab", buffering=0) as log:
            os.dup2(log.fileno(), 2)
        self.console = os.fdopen(os.dup(self._saved_fd), "w", buffering=1)
        logging.captureWarnings(True)  # deprecation warnings: into the log file (fd 2), once each
        return self

    @property
    def is_tty(self) -> bool:
        return self._tty if self._saved_fd is not None else self.console.isatty()

    def __exit__(self, *exc) -> None:
        import os

        logging.getLogger("framescribe").removeHandler(self._handler)
        self._handler.close()
        if self._saved_fd is None:
            return
        sys.stderr.flush()
        logging.captureWarnings(False)
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self.console.close()
        self._saved_fd = None
