"""The rendezvous store: wake-up latency of a blocking ``get``, and ``add`` under contention.

After a rendezvous every agent blocks on ``get(MASTER_ADDR)`` until rank 0 publishes it: the
time from the ``set`` call in one process to the waiting ``get`` returning in another is the
wake-up latency measured here, for torch's ``TCPStore``, this project's ``EtcdStore`` (an
etcd v3 watch) and torch's etcd-v2 ``EtcdStore`` (python-etcd: a v2 watch, then a re-read),
side by side in one run (the stores alternate, batch by batch).

``add`` throughput: 16 threads (each with its own store client) each call ``add`` on one
counter; adds per second, the latency of one ``add``, and the final count checked.

    python -m benchmarks.store_wakeup [--quick] [--rounds 30] [--batches 3] [--adders 16]
                                      [--adds 25]
"""

from __future__ import annotations

import datetime
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_rdzv.testing import free_port
from etcd_rdzv.testing.agents import AgentPool

from . import _backends, _plots
from ._backends import ETCD_V2, ETCD_V3, BenchServers
from ._common import Spread, Topic, markdown_table, option

__all__ = ["STORES", "TOPIC", "Settings", "StoreResults", "collect"]

TCP, V3, V2 = "TCPStore", "EtcdStore", "etcd-v2 EtcdStore"
STORES = (TCP, V3, V2)
#: How long the waiter has been blocked before the setter writes.
BLOCKED_FOR = 0.05
PRELOAD = ("torch.distributed.elastic.rendezvous.etcd_rendezvous_backend",
           "etcd_rdzv.elastic.store", __name__)


@dataclass(frozen=True)
class Settings:
    rounds: int = option(30, "wake-ups per store per batch")
    batches: int = option(3, "alternations of the stores")
    adders: int = option(16, "concurrent add() callers")
    adds: int = option(25, "adds per caller (0: no add benchmark)", low=0)


QUICK = Settings(rounds=10, batches=1, adders=16, adds=5)


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


def _measure(pool: AgentPool, kind: str, address: str, rounds: int) -> list[float]:
    """``rounds`` wake-ups: this process sets, the pool's worker waits in ``get``."""
    store = _make_store(kind, address, master=True)  # TCPStore: this process serves it
    pool.call(waiter_open, kind, address, timeout=120.0)
    # torch's v2 store keeps every run's keys in one directory: keys unique to the run.
    prefix = uuid.uuid4().hex[:8]
    try:
        latencies = []
        for index in range(rounds):
            pool.submit(waiter_get, address, f"{prefix}-key-{index}")
            time.sleep(BLOCKED_FOR)  # the waiter is blocked in get by now
            started = time.monotonic()
            store.set(f"{prefix}-key-{index}", "127.0.0.1")
            returned: float = pool.gather(timeout=60.0, what="get")[0]
            latencies.append(returned - started)
        return latencies
    finally:
        pool.call(waiter_close, address, timeout=60.0)


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


def collect(settings: Settings, say: Callable[[str], None]) -> StoreResults:
    rounds, batches, adders, adds = (settings.rounds, settings.batches, settings.adders,
                                     settings.adds)
    results = StoreResults(rounds=rounds, batches=batches, adders=adders, adds_each=adds)
    kinds = list(STORES)
    reason = _backends.v2_unavailable()
    if reason is not None:
        kinds.remove(V2)
        results.skipped[V2] = reason
    results.wakeups = {kind: [] for kind in kinds}
    results.adds = {kind: [] for kind in kinds}
    with BenchServers(with_tcp_store=False) as servers, AgentPool(1, PRELOAD) as pool:

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


def fragments(results: StoreResults) -> dict[str, str]:
    v3 = statistics.median(results.wakeups[V3]) / statistics.median(results.wakeups[TCP])
    return {
        "settings": "\n".join([
            f"- wake-up: {results.rounds} gets per store per batch, {results.batches} "
            f"batch(es), stores alternating; add: {results.adders} concurrent callers x "
            f"{results.adds_each} adds, once per batch",
            *(f"- skipped: {kind}: {why}" for kind, why in results.skipped.items())]),
        "wakeup_table": wakeup_table(results),
        "wakeup_ratio": f"{v3:.2f}x",
        "add_table": add_table(results) if any(results.adds.values()) else "",
        "blocked_ms": f"{BLOCKED_FOR * 1000:.0f}",
    }


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


TOPIC: Topic[Settings, StoreResults] = Topic(
    "store", __name__, Settings(), QUICK, collect, fragments, plot)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
