"""A pool of worker processes that run module-level functions on command, one pipe each.

The workers are forked from multiprocessing's fork server, which imports the modules given
as ``preload`` once, in a clean process (no thread, no gRPC channel before the fork): N
workers do not each import torch (on 2 busy cores, 64 imports take minutes). Each worker runs
its commands on a thread of its own rather than the main thread: multiprocessing starts a
child from ``python -c ...``, so the main thread's stack begins with a ``<string>`` frame,
and torch's rendezvous handler logs each step through ``inspect.stack()``, which scans every
loaded module for a frame without a source file (3.3 ms a call instead of 0.8 ms here). A
thread's stack begins in ``threading.py``, as torchrun's agent's begins in a file.

Functions are sent by reference (module and name), so they must be importable top-level
functions; a worker keeps whatever state they keep in module globals between calls.
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

__all__ = ["WorkerError", "WorkerPool", "stop_fork_server"]


class WorkerError(RuntimeError):
    """A worker failed or did not answer in time; the message carries its traceback."""


def stop_fork_server() -> None:
    """Stop this process's multiprocessing fork server, so that no process stays behind.

    ``ForkServer._stop`` is what CPython's own tests use; without it the fork server exits
    when this process does.
    """
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if callable(stop):
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


def _worker_main(index: int, conn: Connection) -> None:
    thread = threading.Thread(target=_serve, args=(index, conn), name=f"worker-{index}")
    thread.start()
    thread.join()


def _serve(index: int, conn: Connection) -> None:
    """Answer ``(function, args)`` commands with ``("ok", result)`` or ``("error", text)``."""
    # torch's CPU wheel warns on import when numpy is missing; the workers do not need it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <worker>`: its stacks on stderr
    conn.send(("ok", index))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        function, args = message
        try:
            conn.send(("ok", function(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class WorkerPool:
    """``size`` worker processes; :meth:`call` runs a function on the first ``n`` of them."""

    def __init__(self, size: int, preload: Sequence[str] = ()) -> None:
        self.size = size
        self._preload = list(preload)
        self._context = multiprocessing.get_context("forkserver")
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self.start_seconds = 0.0

    def start(self, timeout: float = 600.0) -> None:
        started = time.monotonic()
        self._context.set_forkserver_preload(self._preload)
        for index in range(self.size):
            parent, child = self._context.Pipe()
            process = self._context.Process(target=_worker_main, args=(index, child),
                                            name=f"bench-worker-{index}", daemon=True)
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
        self._collect(self._conns, timeout, "start")
        self.start_seconds = time.monotonic() - started

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def call(self, n: int, function: Callable[..., Any], args: Sequence[tuple[Any, ...]],
             timeout: float) -> list[Any]:
        """``function(*args[i])`` on worker i, for i < n, all at once; their results in order.

        Raises:
            WorkerError: a worker raised or did not answer within ``timeout`` seconds.
        """
        self.submit(n, function, args)
        return self.gather(n, timeout, getattr(function, "__name__", str(function)))

    def submit(self, n: int, function: Callable[..., Any], args: Sequence[tuple[Any, ...]],
               ) -> None:
        """Start ``function(*args[i])`` on worker i, for i < n; :meth:`gather` the results."""
        if n > self.size:
            raise ValueError(f"The pool has {self.size} workers, not {n}.")
        for conn, one in zip(self._conns[:n], args, strict=True):
            conn.send((function, one))

    def gather(self, n: int, timeout: float, what: str = "a call") -> list[Any]:
        """The results of what :meth:`submit` started on the first ``n`` workers."""
        return self._collect(self._conns[:n], timeout, what)

    def _collect(self, conns: Sequence[Connection], timeout: float, what: str) -> list[Any]:
        answers: dict[int, Any] = {}
        errors: dict[int, str] = {}
        index_of = {id(conn): index for index, conn in enumerate(conns)}
        deadline = time.monotonic() + timeout
        pending = list(conns)
        while pending and not errors:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in wait(pending, min(left, 1.0)):
                assert isinstance(conn, Connection)
                index = index_of[id(conn)]
                pending.remove(conn)
                try:
                    status, body = conn.recv()
                except (EOFError, OSError):
                    errors[index] = "exited without an answer"
                    continue
                if status == "error":
                    errors[index] = body
                else:
                    answers[index] = body
        if pending and not errors:
            for conn in pending:
                errors[index_of[id(conn)]] = f"no answer within {timeout:g} s"
        if errors:
            # The pool cannot be trusted any more (a worker may still be busy): stop it.
            self.stop()
            first = sorted(errors.items())[:3]
            raise WorkerError(f"{len(errors)} worker(s) failed at {what}:\n" + "\n".join(
                f"worker {index}: {text.rstrip()}" for index, text in first))
        return [answers[index] for index in range(len(conns))]

    def stop(self) -> None:
        """Ask every worker to exit; terminate, then kill, those that do not."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + 10.0
        for process in self._processes:
            if process.pid is not None:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.pid is not None and process.is_alive():
                process.terminate()
                process.join(5.0)
            if process.pid is not None and process.is_alive():
                process.kill()
                process.join()
        for conn in self._conns:
            conn.close()
        self._processes.clear()
        self._conns.clear()
        stop_fork_server()

    def __enter__(self) -> WorkerPool:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
