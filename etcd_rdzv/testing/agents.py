"""Rendezvous agents in worker processes, for tests, the demo and the benchmarks.

One :class:`AgentPool` holds ``size`` worker processes; each worker is one agent. The parent
drives every step: it sends a command (a module-level function and its arguments) to the
chosen workers at once and gathers their answers, so agents meet between steps without
barriers of their own, and a test can kill one (:meth:`AgentPool.kill`) between two steps.
The steps an agent takes through torch's handler are functions here:
:func:`build_handler`, :func:`next_rendezvous`, :func:`shutdown_handler`,
:func:`release_handler`; :func:`run_agents` runs them once for ``n`` fresh agents.

Policy:

* The handler comes from :attr:`AgentSpec.factory`, given torch's ``RendezvousParameters``;
  the default is :func:`etcd_rdzv.elastic.create_handler`, so the rendezvous options
  (:attr:`AgentSpec.options`, what ``--rdzv-conf`` would carry) choose the handler:
  ``wait=watch`` the watching one. A benchmark passes a factory of its own to wrap the
  backend; functions are sent by reference, so a factory is a top-level function.
* Workers are forked from multiprocessing's fork server, which imports the ``preload``
  modules once, in a clean process (no thread, no gRPC channel before the fork): N agents
  do not each import torch (64 imports on 2 busy cores take minutes).
* Each worker runs its commands on a thread of its own rather than its main thread.
  multiprocessing starts a child from ``python -c ...``, so the main thread's stack begins
  with a ``<string>`` frame, and torch's handler logs each step through ``inspect.stack()``,
  which then scans every loaded module for the missing source file (3.3 ms a call instead
  of 0.8 ms). A thread's stack begins in ``threading.py``, as torchrun's agent's begins in
  a file.
* A worker that fails or does not answer in time fails the whole pool: it is stopped, and
  :class:`AgentError` carries every worker's traceback. No process is left behind.

This module imports neither torch nor grpc; the workers import them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import math
import multiprocessing
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

__all__ = [
    "LOCAL_ADDR",
    "PRELOAD",
    "AgentError",
    "AgentPool",
    "AgentResult",
    "AgentSetup",
    "AgentSpec",
    "RendezvousFailed",
    "build_handler",
    "current_handler",
    "next_rendezvous",
    "release_handler",
    "run_agents",
    "shutdown_handler",
    "worker_index",
]

#: Every agent and every address stays on loopback.
LOCAL_ADDR = "127.0.0.1"

#: What the fork server imports once, so that every agent starts with torch's handler loaded.
PRELOAD = (
    "torch.distributed.elastic.rendezvous.dynamic_rendezvous",
    "etcd_rdzv.elastic.plugin",
    "etcd_rdzv.elastic.fast_handler",
    "etcd_rdzv.testing.agents",
)

#: Once a worker failed, the others get this long to answer (with their own errors), no more.
_GRACE_SECONDS = 2.0


class AgentError(RuntimeError):
    """Agents failed or did not answer in time; ``failures`` maps worker index to text."""

    def __init__(self, what: str, failures: Mapping[int, str]) -> None:
        self.failures = dict(failures)
        super().__init__(f"{len(failures)} agent(s) failed at {what}:\n" + "\n".join(
            f"agent {index}: {text.rstrip()}" for index, text in sorted(failures.items())))


# --- the pool ------------------------------------------------------------------------------

_WORKER_INDEX: list[int] = []


def worker_index() -> int:
    """This worker's index in its pool (0..size-1); only inside a worker."""
    if not _WORKER_INDEX:
        raise RuntimeError("worker_index() is only known inside an AgentPool worker.")
    return _WORKER_INDEX[0]


def _worker_main(index: int, conn: Connection) -> None:
    _WORKER_INDEX[:] = [index]
    thread = threading.Thread(target=_serve, args=(conn,), name=f"agent-{index}")
    thread.start()
    thread.join()


def _serve(conn: Connection) -> None:
    """Answer ``(function, args)`` commands with ``("ok", result)`` or ``("error", text)``."""
    # torch's CPU wheel warns on import when numpy is missing; the agents do not need it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <worker>`: its stacks on stderr
    conn.send(("ok", None))
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


def _stop_fork_server() -> None:
    """Stop this process's fork server, so that no process stays behind (and the next pool's
    fork server imports its own ``preload``). ``_stop`` is what CPython's own tests use."""
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if callable(stop):
        with contextlib.suppress(OSError, ChildProcessError):
            stop()


class AgentPool:
    """``size`` worker processes that run top-level functions on command.

    A function's result must pickle; a worker keeps whatever a function keeps in module
    globals until the next command. Use as a context manager, or :meth:`start` and
    :meth:`stop`.
    """

    def __init__(self, size: int, preload: Sequence[str] = PRELOAD) -> None:
        if size < 1:
            raise ValueError(f"An AgentPool needs at least one worker, got size={size}.")
        self.size = size
        self._preload = list(preload)
        self._context = multiprocessing.get_context("forkserver")
        self._processes: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self.start_seconds = 0.0
        """How long :meth:`start` took (the fork server's imports and the forks)."""

    def start(self, timeout: float = 600.0) -> None:
        started = time.monotonic()
        self._context.set_forkserver_preload(self._preload)
        for index in range(self.size):
            parent, child = self._context.Pipe()
            process = self._context.Process(target=_worker_main, args=(index, child),
                                            name=f"agent-{index}", daemon=True)
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
        self._collect(range(self.size), timeout, "start")
        self.start_seconds = time.monotonic() - started

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes if process.pid is not None]

    def _chosen(self, workers: Iterable[int] | None) -> list[int]:
        chosen = list(range(self.size)) if workers is None else list(workers)
        if any(not 0 <= index < self.size for index in chosen):
            raise ValueError(f"The pool has workers 0..{self.size - 1}, not {chosen}.")
        return chosen

    def submit(self, function: Callable[..., Any], *args: Any,
               workers: Iterable[int] | None = None) -> None:
        """Start ``function(*args)`` on each chosen worker (default: all); :meth:`gather`."""
        for index in self._chosen(workers):
            self._conns[index].send((function, args))

    def gather(self, workers: Iterable[int] | None = None, timeout: float = 120.0,
               what: str = "a command") -> list[Any]:
        """The answers of the chosen workers to what :meth:`submit` sent, in their order.

        Raises:
            AgentError: a worker raised, exited or did not answer within ``timeout`` seconds;
                the pool is stopped.
        """
        return self._collect(self._chosen(workers), timeout, what)

    def call(self, function: Callable[..., Any], *args: Any,
             workers: Iterable[int] | None = None, timeout: float = 120.0) -> list[Any]:
        """:meth:`submit` then :meth:`gather`."""
        chosen = self._chosen(workers)
        self.submit(function, *args, workers=chosen)
        return self.gather(chosen, timeout, getattr(function, "__name__", str(function)))

    def kill(self, index: int) -> None:
        """Kill worker ``index`` at once (SIGKILL): no shutdown, no last heartbeat."""
        process = self._processes[index]
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
            process.join()

    def _collect(self, workers: Sequence[int], timeout: float, what: str) -> list[Any]:
        answers: dict[int, Any] = {}
        failures: dict[int, str] = {}
        index_of = {id(self._conns[index]): index for index in workers}
        deadline = time.monotonic() + timeout
        pending = [self._conns[index] for index in workers]
        while pending:
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
                    failures[index] = "exited without an answer"
                    continue
                if status == "error":
                    failures[index] = body
                else:
                    answers[index] = body
            if failures:
                deadline = min(deadline, time.monotonic() + _GRACE_SECONDS)
        silent = "no answer; stopped after another agent failed" if failures \
            else f"no answer within {timeout:g} s"
        for conn in pending:
            failures[index_of[id(conn)]] = silent
        if failures:
            self.stop()  # a worker may still be busy: the pool cannot be trusted any more
            raise AgentError(what, failures)
        return [answers[index] for index in workers]

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
        _stop_fork_server()

    def __enter__(self) -> AgentPool:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- one agent: the steps a worker takes ---------------------------------------------------


def _etcd_v3_handler(params: RendezvousParameters) -> RendezvousHandler:
    from etcd_rdzv.elastic import create_handler

    return create_handler(params)


@dataclass(frozen=True)
class AgentSpec:
    """What an agent builds its handler from."""

    endpoint: str
    """etcd's client endpoint(s), the form of ``--rdzv-endpoint``."""
    run_id: str
    min_nodes: int
    max_nodes: int
    options: Mapping[str, object] = field(default_factory=dict)
    """More ``RendezvousParameters`` options, as ``--rdzv-conf`` carries them (``key_prefix``,
    ``wait``, ``join_timeout``, ...); they choose the handler."""
    backend: str = "etcd-v3"
    factory: Callable[[RendezvousParameters], RendezvousHandler] = _etcd_v3_handler
    """Builds the handler; a top-level function (it is sent to the worker by reference)."""

    def parameters(self) -> RendezvousParameters:
        from torch.distributed.elastic.rendezvous import RendezvousParameters

        return RendezvousParameters(self.backend, self.endpoint, self.run_id, self.min_nodes,
                                    self.max_nodes, local_addr=LOCAL_ADDR, **self.options)


@dataclass(frozen=True)
class AgentSetup:
    """What an agent built."""

    index: int
    pid: int
    fast_handler: bool
    """Whether the handler waits on etcd watches (``wait=watch`` took effect)."""


@dataclass(frozen=True)
class AgentResult:
    """What one agent saw of a completed rendezvous."""

    index: int
    """The agent's worker index; not its rank."""
    pid: int
    rank: int
    world_size: int
    round: int
    """The rendezvous round the agent joined (torch's handler state; -1 if not torch's)."""
    seconds: float
    """From the start instant (or the call) to the return of ``next_rendezvous()``."""
    master_addr: str
    """``MASTER_ADDR`` published by rank 0 through the rendezvous store, as this agent read it."""
    master_port: int
    shut_down: bool | None = None
    """What ``handler.shutdown()`` returned; None until :func:`run_agents` shuts it down."""


@dataclass(frozen=True)
class RendezvousFailed:
    """``next_rendezvous()`` raised one of torch's ``RendezvousError`` classes."""

    index: int
    error: str
    """The exception's class name, e.g. ``RendezvousClosedError``."""
    message: str


_HANDLER: list[RendezvousHandler] = []


def current_handler() -> RendezvousHandler:
    """This worker's handler (built by :func:`build_handler`)."""
    if not _HANDLER:
        raise RuntimeError("This agent has no handler: call build_handler first.")
    return _HANDLER[0]


def build_handler(spec: AgentSpec) -> AgentSetup:
    """Build this worker's handler from ``spec`` (replacing any it had)."""
    from etcd_rdzv.elastic.fast_handler import is_fast_handler

    handler = spec.factory(spec.parameters())
    _HANDLER[:] = [handler]
    return AgentSetup(worker_index(), os.getpid(), is_fast_handler(handler))


def next_rendezvous(start_at: float | None = None,
                    dump_after: float | None = None) -> AgentResult | RendezvousFailed:
    """Join the next rendezvous at ``start_at`` (a ``time.monotonic()`` instant, shared by
    every process on the host), or at once.

    With ``dump_after``, an agent still waiting that many seconds later writes its threads'
    stacks to stderr (it keeps waiting).
    """
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
    )

    handler = current_handler()
    started = time.monotonic() if start_at is None else start_at
    if start_at is not None and start_at > time.monotonic():
        time.sleep(start_at - time.monotonic())
    if dump_after is not None:
        faulthandler.dump_traceback_later(dump_after)
    try:
        info = handler.next_rendezvous()
    except RendezvousError as exc:
        return RendezvousFailed(worker_index(), type(exc).__name__, str(exc))
    finally:
        if dump_after is not None:
            faulthandler.cancel_dump_traceback_later()
    seconds = time.monotonic() - started
    # torch exposes no public round; its handler's state holds it.
    round_ = handler._state_holder.state.round \
        if isinstance(handler, DynamicRendezvousHandler) else -1
    store_info = info.bootstrap_store_info
    master_addr, master_port = (store_info.master_addr, store_info.master_port) \
        if store_info is not None else ("", 0)
    return AgentResult(index=worker_index(), pid=os.getpid(), rank=info.rank,
                       world_size=info.world_size, round=round_, seconds=seconds,
                       master_addr=master_addr, master_port=master_port)


def shutdown_handler() -> bool:
    """``handler.shutdown()``: close the rendezvous for everyone; what it returned."""
    return bool(current_handler().shutdown())


def release_handler() -> None:
    """Drop this worker's handler (rank 0's bootstrap ``TCPStore`` server goes with it)."""
    _HANDLER.clear()
    gc.collect()


def run_agents(endpoint: str, run_id: str, n: int = 4, timeout: float = 60.0, *,
               options: Mapping[str, object] | None = None) -> list[AgentResult]:
    """``n`` fresh agents (``min_nodes = max_nodes = n``) meet once, then shut down.

    Every agent builds its handler, all start ``next_rendezvous()`` at one instant, and once
    all have returned each calls ``shutdown()``.

    Args:
        endpoint: etcd's client endpoint(s).
        run_id: the rendezvous run id; use a fresh one per call.
        n: the number of agents.
        timeout: the bound on each step, seconds; also torch's ``join_timeout`` and
            ``close_timeout`` unless ``options`` sets them.
        options: more rendezvous options (``key_prefix``, ``wait``, ``read_timeout``, ...).

    Returns:
        Each agent's result, by worker index.

    Raises:
        AgentError: an agent failed, its rendezvous did not complete, or it did not answer
            within ``timeout``; no process is left behind.
    """
    seconds = max(1, math.ceil(timeout))
    config: dict[str, object] = {"join_timeout": seconds, "close_timeout": seconds}
    config.update(options or {})
    spec = AgentSpec(endpoint, run_id, n, n, config)
    with AgentPool(n) as pool:
        pool.call(build_handler, spec, timeout=timeout)
        # Everyone is built and connected: the times measure the rendezvous, not imports.
        start_at = time.monotonic() + 0.1 + 0.002 * n
        joined = pool.call(next_rendezvous, start_at, timeout=timeout)
        failed = {o.index: f"{o.error}: {o.message}" for o in joined
                  if isinstance(o, RendezvousFailed)}
        if failed:
            raise AgentError("next_rendezvous", failed)
        # shutdown() closes the rendezvous for everyone: only now that every agent is in.
        shut_down = pool.call(shutdown_handler, timeout=timeout)
    return [replace(result, shut_down=done) for result, done in zip(joined, shut_down,
                                                                    strict=True)]
