"""The rendezvous store: wake-up latency of a blocking ``get``, and ``add`` under contention.

After a rendezvous every agent blocks on ``get(MASTER_ADDR)`` until rank 0 publishes it: the
time from the ``set`` call in one process to the waiting ``get`` returning in another is the
wake-up latency measured here, for torch's ``TCPStore``, this project's ``EtcdStore`` (an
etcd v3 watch) and torch's etcd-v2 ``EtcdStore`` (python-etcd: a v2 watch, then a re-read),
side by side in one run (the stores alternate, batch by batch).

``add`` throughput: 16 threads (each with its own store client) each call ``add`` on one
counter; adds per second, the latency of one ``add``, and the final count checked.

    python -m benchmarks.store_wakeup [--rounds 30] [--batches 3] [--adders 16] [--adds 25]
                                      [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_rdzv.testing import free_port

from . import _backends, _plots
from ._backends import ETCD_V2, ETCD_V3, BenchServers
from ._common import (
    RESULTS_DIR,
    Spread,
    exit_on_sigterm,
    machine_description,
    markdown_table,
    now_utc,
    positive,
    progress,
    publish,
)
from ._pool import WorkerPool

__all__ = ["STORES", "StoreResults", "collect", "main", "markdown"]

DEFAULT_OUTPUT = RESULTS_DIR / "store_wakeup.md"
TCP, V3, V2 = "TCPStore", "EtcdStore", "etcd-v2 EtcdStore"
STORES = (TCP, V3, V2)
#: How long the waiter has been blocked before the setter writes.
BLOCKED_FOR = 0.05
PRELOAD = (
    "torch.distributed.elastic.rendezvous.etcd_rendezvous_backend",
    "etcd_rdzv.elastic.store",
    "benchmarks._backends",
)
#: (rounds, batches, adders, adds per adder)
FULL = (30, 3, 16, 25)
QUICK = (10, 1, 16, 5)


def _make_store(kind: str, address: str, master: bool) -> Any:
    """A store client of ``kind``; TCPStore's master also serves it from this process."""
    if kind == TCP:
        from torch._C._distributed_c10d import TCPStore

        host, port = address.rsplit(":", 1)
        return TCPStore(host, int(port), None, master, timeout=datetime.timedelta(seconds=60),
                        wait_for_workers=False, multi_tenant=True)
    endpoint, run_id = address.split("|")
    backend = ETCD_V3 if kind == V3 else ETCD_V2
    params = _backends.parameters(backend, endpoint, run_id, config={"read_timeout": 60})
    _made, store = _backends.create_backend(backend, params)
    store.set_timeout(datetime.timedelta(seconds=60))
    return store


#: The waiter's store clients, by address (in the worker process).
_CLIENTS: dict[str, Any] = {}


def waiter_open(kind: str, address: str) -> None:
    """Create the waiter's client (run in the worker process)."""
    _CLIENTS[address] = _make_store(kind, address, master=False)


def waiter_get(address: str, key: str) -> float:
    """Block on ``get(key)``; return the monotonic time it returned (in the worker)."""
    _CLIENTS[address].get(key)
    return time.monotonic()


def waiter_close(address: str) -> None:
    store = _CLIENTS.pop(address)
    close = getattr(store, "close", None)
    if callable(close):
        close()


def _measure(pool: WorkerPool, kind: str, address: str, rounds: int) -> list[float]:
    """``rounds`` wake-ups: this process sets, the pool's worker waits in ``get``."""
    store = _make_store(kind, address, master=True)  # TCPStore: this process serves it
    pool.call(1, waiter_open, [(kind, address)], 120.0)
    # torch's v2 store keeps every run's keys in one directory: keys unique to the run.
    prefix = uuid.uuid4().hex[:8]
    try:
        latencies = []
        for index in range(rounds):
            pool.submit(1, waiter_get, [(address, f"{prefix}-key-{index}")])
            time.sleep(BLOCKED_FOR)  # the waiter is blocked in get by now
            started = time.monotonic()
            store.set(f"{prefix}-key-{index}", "127.0.0.1")
            returned: float = pool.gather(1, 60.0, "get")[0]
            latencies.append(returned - started)
        return latencies
    finally:
        pool.call(1, waiter_close, [(address,)], 60.0)


@dataclass(frozen=True)
class AddRun:
    seconds: float
    latencies: list[float]
    final: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds


def _adders(kind: str, address: str, callers: int, adds: int) -> AddRun:
    """``callers`` threads, each with its own client, each adding 1 ``adds`` times."""
    server = _make_store(kind, address, master=True) if kind == TCP else None
    stores = [_make_store(kind, address, master=False) for _ in range(callers)]
    latencies: list[list[float]] = [[] for _ in range(callers)]
    counter = f"counter-{uuid.uuid4().hex[:8]}"
    errors: list[BaseException] = []
    barrier = threading.Barrier(callers + 1)

    def run(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(adds):
                started = time.perf_counter()
                stores[index].add(counter, 1)
                latencies[index].append(time.perf_counter() - started)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{kind}: an add failed: {errors[0]!r}") from errors[0]
    final = int(stores[0].add(counter, 0))
    for store in stores:
        close = getattr(store, "close", None)  # only this project's EtcdStore has one
        if callable(close) and kind == V3:
            close()
    del server
    return AddRun(seconds, [x for one in latencies for x in one], final)


@dataclass
class StoreResults:
    wakeups: dict[str, list[float]] = field(default_factory=dict)
    adds: dict[str, list[AddRun]] = field(default_factory=dict)
    rounds: int = 0
    batches: int = 0
    adders: int = 0
    adds_each: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def collect(*, rounds: int, batches: int, adders: int, adds: int,
            progress: Callable[[str], None] | None = None) -> StoreResults:
    say = progress or (lambda line: None)
    results = StoreResults(rounds=rounds, batches=batches, adders=adders, adds_each=adds)
    kinds = list(STORES)
    reason = _backends.v2_unavailable()
    if reason is not None:
        kinds.remove(V2)
        results.skipped[V2] = reason
    results.wakeups = {kind: [] for kind in kinds}
    results.adds = {kind: [] for kind in kinds}
    with BenchServers(with_tcp_store=False) as servers, WorkerPool(1, PRELOAD) as pool:

        def address(kind: str) -> str:
            if kind == TCP:
                return f"127.0.0.1:{free_port()}"
            return f"{servers.etcd_endpoint}|store-{uuid.uuid4().hex[:8]}"

        for batch in range(batches):
            shift = batch % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                results.wakeups[kind] += _measure(pool, kind, address(kind), rounds)
                run = _adders(kind, address(kind), adders, adds) if adds else None
                if run is not None:
                    if run.final != adders * adds:
                        raise RuntimeError(f"{kind}: {adders} x {adds} adds made "
                                           f"{run.final}")
                    results.adds[kind].append(run)
                say(f"store: batch {batch + 1}, {kind}: wake-up median "
                    f"{statistics.median(results.wakeups[kind]) * 1000:.2f} ms"
                    + (f", {run.rate:.0f} adds/s" if run is not None else ""))
    return results


def wakeup_table(results: StoreResults) -> str:
    rows = []
    for kind, values in results.wakeups.items():
        ms = [v * 1000 for v in values]
        rows.append([kind, len(ms), f"{statistics.median(ms):.2f}", f"{min(ms):.2f}",
                     f"{max(ms):.2f}",
                     f"{statistics.median(values) / statistics.median(results.wakeups[TCP]):.2f}"])
    return markdown_table(["store", "gets", "median ms", "min ms", "max ms", "/ TCPStore"], rows)


def add_table(results: StoreResults) -> str:
    rows = []
    for kind, runs in results.adds.items():
        if not runs:
            continue
        latencies = sorted(x * 1000 for run in runs for x in run.latencies)
        rows.append([kind, f"{results.adders} x {results.adds_each} x {len(runs)}",
                     Spread.of(run.rate for run in runs).format(digits=0),
                     f"{statistics.median(latencies):.2f}", f"{latencies[-1]:.1f}",
                     "yes" if all(run.final == results.adders * results.adds_each
                                  for run in runs) else "NO"])
    return markdown_table(["store", "callers x adds x runs", "adds/s", "median add ms",
                           "max add ms", "final count right"], rows, "llrrrl")


def ratio_line(results: StoreResults) -> str:
    v3 = statistics.median(results.wakeups[V3]) / statistics.median(results.wakeups[TCP])
    return f"EtcdStore / TCPStore median wake-up latency: {v3:.2f}x"


NOTES = (
    "Wake-up: from the `set` call in one process to the blocked `get` returning in another "
    f"(the waiter blocks {BLOCKED_FOR * 1000:.0f} ms first); the two clocks are one "
    "(CLOCK_MONOTONIC). TCPStore is served by the setting process, as rank 0's agent serves "
    "it in torchrun. EtcdStore returns the value from the watch event; torch's etcd-v2 "
    "store re-reads its whole directory after each event. `add`: each of the callers is a "
    "thread with its own client (this project's clients in one process share one event-loop "
    "thread); EtcdStore's add is a compare-and-swap loop of one Txn per attempt, torch's "
    "v2 store's a read then a compare-and-swap, with a random pause of up to 0.1 s after "
    "each failed attempt; TCPStore adds on its server, in memory."
)


def markdown(results: StoreResults) -> str:
    lines = [
        f"- wake-up: {results.rounds} gets per store per batch, {results.batches} batch(es), "
        f"stores alternating; add: {results.adders} concurrent callers x "
        f"{results.adds_each} adds, once per batch",
        *(f"- skipped: {kind}: {why}" for kind, why in results.skipped.items()),
        "",
        wakeup_table(results),
        "",
        ratio_line(results),
    ]
    if any(results.adds.values()):
        lines += ["", add_table(results)]
    return "\n".join([*lines, "", NOTES])


def plot(results: StoreResults, directory: Path) -> list[Path]:
    plt = _plots.pyplot()
    has_adds = any(results.adds.values())
    figure, axes_list = plt.subplots(1, 2 if has_adds else 1, figsize=(10 if has_adds else 5, 4),
                                     squeeze=False)
    colors = {TCP: _plots.COLORS["c10d"], V3: _plots.COLORS["etcd-v3"],
              V2: _plots.COLORS["etcd-v2"]}
    axes = axes_list[0][0]
    kinds = list(results.wakeups)
    axes.boxplot([[v * 1000 for v in results.wakeups[k]] for k in kinds], whis=(0, 100))
    axes.set_xticks(range(1, len(kinds) + 1), kinds)
    axes.set_yscale("log")
    axes.set_ylabel("wake-up latency, ms")
    axes.set_title("Blocking get wake-up (box: quartiles; whiskers: min to max)", fontsize=10)
    if has_adds:
        axes = axes_list[0][1]
        kinds = [k for k in results.adds if results.adds[k]]
        rates = [Spread.of(run.rate for run in results.adds[k]) for k in kinds]
        axes.bar(range(len(kinds)), [r.median for r in rates],
                 yerr=[[r.median - r.low for r in rates], [r.high - r.median for r in rates]],
                 color=[colors[k] for k in kinds], capsize=3)
        axes.set_xticks(range(len(kinds)), kinds)
        axes.set_yscale("log")
        axes.set_ylabel("adds per second")
        axes.set_title(f"add() from {results.adders} concurrent callers")
    return [_plots.save(figure, directory / "store.png")]


def report(results: StoreResults, *, command: str) -> str:
    return "\n".join(["# Rendezvous store", "", f"Command: `{command}`", "",
                      f"- date: {now_utc()}", *machine_description(), markdown(results), ""])


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_wakeup",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=positive, default=None,
                        help=f"gets per store per batch (default {FULL[0]})")
    parser.add_argument("--batches", type=positive, default=None,
                        help=f"alternations of the stores (default {FULL[1]})")
    parser.add_argument("--adders", type=positive, default=None,
                        help=f"concurrent add() callers (default {FULL[2]})")
    parser.add_argument("--adds", type=int, default=None,
                        help=f"adds per caller, 0 for none (default {FULL[3]})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(args_list)
    rounds, batches, adders, adds = QUICK if args.quick else FULL
    command = shlex.join(["python", "-m", "benchmarks.store_wakeup", *args_list])
    with exit_on_sigterm():
        results = collect(
            rounds=args.rounds or rounds, batches=args.batches or batches,
            adders=args.adders or adders, adds=adds if args.adds is None else args.adds,
            progress=progress)
    text = report(results, command=command)
    publish(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
