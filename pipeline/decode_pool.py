"""A small pool of reusable, killable child processes: run one picklable call at a time in a child, with a
timeout. A child that hangs past the timeout is killed and replaced; one that dies is reported with how it
died. Generic (it knows nothing about video); `pipeline.decode` runs its decodes through it."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Callable


class ChildTimeout(Exception):
    """The call ran past its timeout; the child was killed (and a fresh one started)."""


class ChildDied(Exception):
    """The child died while running the call (a segfault, the OOM killer); the message says how."""


class ChildUnavailable(Exception):
    """No child could be started or reached."""


def _set_parent_death_signal() -> None:
    """Linux: die with the parent, so a hung child does not outlive a killed Ray worker."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _child_main(conn, warm_up: Callable[[], Any] | None) -> None:
    _set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent
    if warm_up is not None:
        try:
            warm_up()
        except Exception:
            pass  # the call itself reports it
    conn.send(("ready", None))
    while True:
        try:
            fn, args, hang = conn.recv()
        except (EOFError, OSError):
            return
        if hang:  # test hook: behave like a decoder stuck forever
            while True:
                time.sleep(3600)
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as e:  # the caller decides what an exception means
            try:
                conn.send(("err", e))
            except Exception:  # an exception that does not pickle still comes back, as text
                conn.send(("err", RuntimeError(f"{type(e).__name__}: {e}")))


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Child:
    """One child process and the pipe to it."""

    START_TIMEOUT_S = 120.0

    def __init__(self, ctx, warm_up, name: str):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child_main, args=(child, warm_up), daemon=True, name=name)
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(self.START_TIMEOUT_S):
            raise RuntimeError("child process did not start")
        msg = self.conn.recv()  # EOFError when it died while starting
        if msg[0] != "ready":
            raise RuntimeError(f"child process sent {msg[0]!r} instead of ready")
        self.ready = True

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        except Exception:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


class ChildPool:
    """Reusable children (forkserver: safe for threaded callers such as Ray workers), at most `max_idle` kept."""

    def __init__(self, warm_up: Callable[[], Any] | None = None, max_idle: int = 4, name: str = "framescribe-child"):
        self.warm_up, self.max_idle, self.name = warm_up, max_idle, name
        self._lock = threading.Lock()
        self._idle: list[_Child] = []
        self._pid: int | None = None

    def _new(self) -> _Child:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        return _Child(ctx, self.warm_up, self.name)

    def _acquire(self) -> _Child:
        with self._lock:
            if self._pid != os.getpid():  # a forked copy must not share the parent's children
                self._idle.clear()
                self._pid = os.getpid()
            while self._idle:
                c = self._idle.pop()
                if c.alive():
                    return c
                c.kill()
        return self._new()

    def _release(self, c: _Child) -> None:
        with self._lock:
            if c.alive() and len(self._idle) < self.max_idle and self._pid == os.getpid():
                self._idle.append(c)
                return
        c.kill()

    def _replace(self, c: _Child) -> None:
        """Kill a hung or dead child and start its replacement now, so the next call finds it warm."""
        c.kill()
        try:
            self._release(self._new())
        except Exception:
            pass

    def shutdown(self) -> None:
        with self._lock:
            children, self._idle[:] = list(self._idle), []
        for c in children:
            c.kill()

    def call(self, fn: Callable, args: tuple, timeout_s: float, *, hang: bool = False):
        """fn(*args) in a child. Returns its result or re-raises its exception; raises ChildTimeout,
        ChildDied or ChildUnavailable for what went wrong around it. fn and args must pickle."""
        for attempt in range(2):  # a second try only when an idle child turned out to be dead
            c = None
            try:
                c = self._acquire()
                c.wait_ready()
            except Exception as e:
                if c is not None:
                    c.kill()
                if attempt == 0:
                    continue
                raise ChildUnavailable(f"cannot start a child process: {type(e).__name__}: {e}") from None
            try:
                c.conn.send((fn, args, hang))
            except (BrokenPipeError, EOFError, OSError):
                c.kill()
                if attempt == 0:
                    continue
                raise ChildUnavailable("child process is not reachable") from None
            except Exception as e:  # e.g. an argument that cannot be pickled
                self._release(c)
                raise ChildUnavailable(f"cannot send the task to the child process: {type(e).__name__}: {e}") from None
            break
        try:
            done = c.conn.poll(timeout_s)
        except (EOFError, OSError):
            done = True
        if not done:
            self._replace(c)
            raise ChildTimeout(f"took longer than {timeout_s:g}s; child process killed")
        try:
            status, payload = c.conn.recv()
        except (EOFError, OSError):
            c.proc.join(5)
            how = exit_reason(c.proc.exitcode)
            self._replace(c)
            raise ChildDied(how) from None
        except Exception as e:  # a result that cannot be unpickled
            self._replace(c)
            raise ChildUnavailable(f"bad reply from the child process: {type(e).__name__}: {e}") from None
        self._release(c)
        if status == "ok":
            return payload
        raise payload
