"""Wake-up latency of a blocking store ``get``: set in one process, returned in another.

After a rendezvous every agent blocks on ``get(MASTER_ADDR)`` until rank 0 publishes it: the
time from the ``set`` call to the waiting ``get`` returning is what this measures, for
torch's ``TCPStore`` and for ``EtcdStore`` (which waits on an etcd watch), side by side in
one run (the stores alternate, round by round).

    python -m benchmarks.store_wakeup [--rounds 30] [--output PATH]
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import platform
import statistics
import sys
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from etcd_rdzv.testing import EtcdServer, free_port

STORES = ("TCPStore", "EtcdStore")
#: How long the waiter has been blocked before the setter writes.
BLOCKED_FOR = 0.05


def _make_store(kind: str, address: str, master: bool) -> Any:
    if kind == "TCPStore":
        from torch._C._distributed_c10d import TCPStore

        host, port = address.rsplit(":", 1)
        return TCPStore(host, int(port), 2, master, timeout=datetime.timedelta(seconds=30),
                        wait_for_workers=False)
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from etcd_rdzv.elastic import create_backend

    endpoint, run_id = address.split("|")
    _, store = create_backend(RendezvousParameters("etcd-v3", endpoint, run_id, 1, 2))
    store.set_timeout(datetime.timedelta(seconds=30))
    return store


def _waiter(kind: str, address: str, rounds: int, pipe: Connection) -> None:
    store = _make_store(kind, address, master=False)
    pipe.send("ready")
    for index in range(rounds):
        pipe.recv()  # "go"
        pipe.send("waiting")
        store.get(f"key-{index}")
        pipe.send(time.monotonic())


def _measure(kind: str, address: str, rounds: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    store = _make_store(kind, address, master=True)  # TCPStore: this process serves it
    parent, child = context.Pipe()
    waiter = context.Process(target=_waiter, args=(kind, address, rounds, child))
    waiter.start()
    try:
        assert parent.recv() == "ready"
        latencies = []
        for index in range(rounds):
            parent.send("go")
            assert parent.recv() == "waiting"
            time.sleep(BLOCKED_FOR)
            started = time.monotonic()
            store.set(f"key-{index}", "127.0.0.1")
            returned = parent.recv()
            latencies.append(returned - started)
        return latencies
    finally:
        waiter.join(timeout=30)
        if waiter.is_alive():
            waiter.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", type=int, default=3,
                        help="alternations of the two stores (each runs --rounds gets)")
    parser.add_argument("--output", type=Path,
                        default=Path("benchmarks/results/store_wakeup.md"))
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {kind: [] for kind in STORES}
    with EtcdServer() as server:
        for batch in range(args.batches):
            order = STORES if batch % 2 == 0 else STORES[::-1]
            for kind in order:
                address = f"127.0.0.1:{free_port()}" if kind == "TCPStore" \
                    else f"{server.get_endpoint()}|wakeup-{uuid.uuid4().hex[:8]}"
                results[kind] += _measure(kind, address, args.rounds)
    lines = ["| store | gets | median ms | min ms | max ms |", "|---|---:|---:|---:|---:|"]
    for kind in STORES:
        values = [v * 1000 for v in results[kind]]
        lines.append(f"| {kind} | {len(values)} | {statistics.median(values):.2f} | "
                     f"{min(values):.2f} | {max(values):.2f} |")
    ratio = statistics.median(results["EtcdStore"]) / statistics.median(results["TCPStore"])
    report = "\n".join([
        f"Command: `python -m benchmarks.store_wakeup {' '.join(argv or sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {multiprocessing.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "", *lines, "",
        f"EtcdStore / TCPStore median wake-up latency: {ratio:.2f}x",
    ])
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
