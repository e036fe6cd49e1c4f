"""Per-call latency of the rendezvous backend, side by side with raw aetcd floors.

Run::

    python -m benchmarks.backend_calls [--quick] [--calls N] [--rounds R] [--warmup W]
                                       [--output PATH]

One etcd (:class:`etcd_rdzv.testing.EtcdServer`, loopback, fsync on) serves every variant,
each on its own key:

* ``raw txn`` (floor A): an aetcd ``Txn`` (compare ``mod_revision`` → ``Put`` with a lease,
  else ``Range``), the token updated each time: the work of a successful CAS.
* ``raw get`` (floor B): an aetcd linearizable ``get``.
* ``async get_state``, ``async set_state`` (CAS that succeeds), ``async set_state stale``
  (the conflict path: one ``Txn`` that returns the current state), awaited on asyncio.
* ``shim get_state``, ``shim set_state``: the sync :class:`EtcdRendezvousBackend`, called
  from the main thread while its coroutines run on the portal's loop thread.

Each round runs every variant for ``--calls`` sequential calls, the order rotated from round
to round so that machine noise falls on all of them alike. The asyncio variants run on one
event loop of the main thread, driven only during their own phase, so the shim is always
called from a thread with no running loop. Setup and ``--warmup`` calls (the first
``set_state`` grants a lease) are not measured. Timings are printed and written as Markdown;
nothing about them is asserted: the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import aetcd

from etcd_rdzv._connection import EtcdClient
from etcd_rdzv.backend import AsyncEtcdRendezvousBackend
from etcd_rdzv.codec import HEADER_SIZE
from etcd_rdzv.config import EtcdConfig, parse_endpoints
from etcd_rdzv.elastic.backend import EtcdRendezvousBackend
from etcd_rdzv.testing import EtcdServer, find_etcd_binary

__all__ = ["DEFAULT_OUTPUT", "Variant", "main", "run"]

T = TypeVar("T")

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "backend_calls.md"
STATE_SIZE = 300
KEY_PREFIX = "/etcd-rdzv-bench"
#: Per-RPC deadline of the raw client (aetcd's default, None, waits forever on a hung server).
RAW_TIMEOUT = 5.0
#: The backend's lease is ttl + window (7200 + 60 s by default); the raw floor's put too.
RAW_LEASE_TTL = 7260
#: (calls per variant per round, rounds, warm-up calls per variant)
#: Many short rounds interleave better than a few long ones on a machine whose load drifts.
FULL = (100, 15, 30)
QUICK = (50, 5, 10)

RAW_TXN, RAW_GET = "raw txn", "raw get"


class BenchmarkError(RuntimeError):
    """A call did not do what the variant measures (a CAS that failed, a missing key)."""


class Variant:
    """One kind of call; ``floor`` names the raw variant its ratio is taken against."""

    name: str
    floor: str | None = None
    is_async: bool

    async def asetup(self) -> None:
        """Prepare on the benchmark's event loop (async variants)."""

    def setup(self) -> None:
        """Prepare from the main thread (sync variants)."""

    async def acall(self) -> None:
        raise NotImplementedError

    def call(self) -> None:
        raise NotImplementedError


class AsyncVariant(Variant):
    is_async = True


class SyncVariant(Variant):
    is_async = False


class RawTxn(AsyncVariant):
    name = RAW_TXN

    def __init__(self, client: Any, key: bytes, value: bytes) -> None:
        self._client, self._key, self._value = client, key, value
        self._lease_id = 0
        self._token = 0

    async def asetup(self) -> None:
        lease = await self._client.lease(RAW_LEASE_TTL)
        self._lease_id = int(lease.id)
        tx = self._client.transactions
        ok, responses = await self._client.transaction(
            compare=[tx.create(self._key) == 0],
            success=[tx.put(self._key, self._value, lease=self._lease_id)],
            failure=[tx.get(self._key)],
        )
        if not ok:
            raise BenchmarkError(f"The key {self._key!r} already exists.")
        self._token = int(responses[0].response_put.header.revision)

    async def acall(self) -> None:
        tx = self._client.transactions  # compare objects are mutated by ==: fresh ones
        ok, responses = await self._client.transaction(
            compare=[tx.mod(self._key) == self._token],
            success=[tx.put(self._key, self._value, lease=self._lease_id)],
            failure=[tx.get(self._key)],
        )
        if not ok:
            raise BenchmarkError(f"The raw CAS on {self._key!r} failed.")
        self._token = int(responses[0].response_put.header.revision)


class RawGet(AsyncVariant):
    name = RAW_GET

    def __init__(self, client: Any, key: bytes, value: bytes) -> None:
        self._client, self._key, self._value = client, key, value

    async def asetup(self) -> None:
        await self._client.put(self._key, self._value)

    async def acall(self) -> None:
        if await self._client.get(self._key) is None:
            raise BenchmarkError(f"The key {self._key!r} is missing.")


class AsyncGet(AsyncVariant):
    name = "async get_state"
    floor = RAW_GET

    def __init__(self, backend: AsyncEtcdRendezvousBackend, state: bytes) -> None:
        self._backend, self._state = backend, state

    async def asetup(self) -> None:
        result = await self._backend.set_state(self._state, None)
        if result is None or not result[2]:
            raise BenchmarkError("Creating the state failed.")

    async def acall(self) -> None:
        if await self._backend.get_state() is None:
            raise BenchmarkError("The state is missing.")


class AsyncSet(AsyncVariant):
    name = "async set_state"
    floor = RAW_TXN

    def __init__(self, backend: AsyncEtcdRendezvousBackend, state: bytes) -> None:
        self._backend, self._state = backend, state
        self._token: int | None = None

    async def asetup(self) -> None:
        await self.acall()  # creates the state (token None) and grants the lease

    async def acall(self) -> None:
        result = await self._backend.set_state(self._state, self._token)
        if result is None or not result[2]:
            raise BenchmarkError(f"A CAS with the current token {self._token} failed.")
        self._token = result[1]


class AsyncSetStale(AsyncVariant):
    name = "async set_state stale"
    floor = RAW_TXN

    def __init__(self, backend: AsyncEtcdRendezvousBackend, state: bytes) -> None:
        self._backend, self._state = backend, state
        self._stale = 0
        self._current = 0

    async def asetup(self) -> None:
        first = await self._backend.set_state(self._state, None)
        if first is None or not first[2]:
            raise BenchmarkError("Creating the state failed.")
        second = await self._backend.set_state(self._state, first[1])
        if second is None or not second[2]:
            raise BenchmarkError("Updating the state failed.")
        self._stale, self._current = first[1], second[1]

    async def acall(self) -> None:
        result = await self._backend.set_state(self._state, self._stale)
        if result is None or result[2] or result[1] != self._current:
            raise BenchmarkError(f"A stale CAS did not return the current state: {result!r}")


class ShimGet(SyncVariant):
    name = "shim get_state"
    floor = RAW_GET

    def __init__(self, backend: EtcdRendezvousBackend, state: bytes) -> None:
        self._backend, self._state = backend, state

    def setup(self) -> None:
        result = self._backend.set_state(self._state, None)
        if result is None or not result[2]:
            raise BenchmarkError("Creating the state failed.")

    def call(self) -> None:
        if self._backend.get_state() is None:
            raise BenchmarkError("The state is missing.")


class ShimSet(SyncVariant):
    name = "shim set_state"
    floor = RAW_TXN

    def __init__(self, backend: EtcdRendezvousBackend, state: bytes) -> None:
        self._backend, self._state = backend, state
        self._token: Any = None

    def setup(self) -> None:
        self.call()  # creates the state (token None) and grants the shim's lease

    def call(self) -> None:
        result = self._backend.set_state(self._state, self._token)
        if result is None or not result[2]:
            raise BenchmarkError(f"A CAS with the current token {self._token} failed.")
        self._token = result[1]


async def _time_async(variant: Variant, calls: int) -> list[int]:
    samples: list[int] = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await variant.acall()
        samples.append(time.perf_counter_ns() - start)
    return samples


def _time_sync(variant: Variant, calls: int) -> list[int]:
    samples: list[int] = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        variant.call()
        samples.append(time.perf_counter_ns() - start)
    return samples


class _Loop:
    """An event loop of the main thread, running only inside :meth:`run`."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(
                    asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()


@dataclass(frozen=True)
class Result:
    """The latencies of one variant, in ns, one list per round."""

    variant: str
    floor: str | None
    rounds: list[list[int]]

    @property
    def all(self) -> list[int]:
        return [sample for samples in self.rounds for sample in samples]


def measure(endpoint: str, host: str, port: int, *, calls: int, rounds: int,
            warmup: int) -> list[Result]:
    """Set up every variant on the etcd at ``endpoint`` and time them in rotated rounds."""
    run_tag = uuid.uuid4().hex[:8]
    state = os.urandom(STATE_SIZE)
    stored = os.urandom(STATE_SIZE + HEADER_SIZE)  # what the backend stores: same size
    config = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=30.0,
                        request_timeout=RAW_TIMEOUT, connect_timeout=10.0)
    loop = _Loop()
    raw = aetcd.Client(host, port, timeout=RAW_TIMEOUT)
    client = EtcdClient(config)
    shim_client = EtcdClient(config)

    def backend(variant: str) -> AsyncEtcdRendezvousBackend:
        return AsyncEtcdRendezvousBackend(client, f"{run_tag}-{variant}", key_prefix=KEY_PREFIX)

    def shim(variant: str) -> EtcdRendezvousBackend:
        return EtcdRendezvousBackend(shim_client, f"{run_tag}-{variant}", key_prefix=KEY_PREFIX)

    shim_get, shim_set = shim("shim-get"), shim("shim-set")
    variants: list[Variant] = [
        RawTxn(raw, f"{KEY_PREFIX}/{run_tag}-raw-txn".encode(), stored),
        RawGet(raw, f"{KEY_PREFIX}/{run_tag}-raw-get".encode(), stored),
        AsyncGet(backend("async-get"), state),
        AsyncSet(backend("async-set"), state),
        AsyncSetStale(backend("async-set-stale"), state),
        ShimGet(shim_get, state),
        ShimSet(shim_set, state),
    ]
    shim_used = False
    try:
        for variant in variants:
            if variant.is_async:
                loop.run(variant.asetup())
            else:
                shim_used = True
                variant.setup()
        for variant in variants:
            if variant.is_async:
                loop.run(_time_async(variant, warmup))
            else:
                _time_sync(variant, warmup)
        samples: dict[str, list[list[int]]] = {variant.name: [] for variant in variants}
        for index in range(rounds):
            shift = index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                if variant.is_async:
                    samples[variant.name].append(loop.run(_time_async(variant, calls)))
                else:
                    samples[variant.name].append(_time_sync(variant, calls))
        return [Result(v.name, v.floor, samples[v.name]) for v in variants]
    finally:
        try:
            with contextlib.suppress(Exception):
                loop.run(client.close())
            with contextlib.suppress(Exception):
                loop.run(raw.close())
            if shim_used:
                with contextlib.suppress(Exception):
                    shim_set.close()  # the shim's client, shared by both shim variants
        finally:
            loop.close()


def _us(ns: float) -> str:
    return f"{ns / 1000:,.1f}"


def _percentile(sorted_samples: Sequence[int], fraction: float) -> float:
    index = min(len(sorted_samples) - 1, max(0, round(fraction * (len(sorted_samples) - 1))))
    return float(sorted_samples[index])


def format_tables(results: Sequence[Result]) -> str:
    """The latency table and the ratio table, in Markdown."""
    by_name = {result.variant: result for result in results}
    lines = [
        "| variant | calls | median µs | p90 µs | min µs | max µs |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        samples = sorted(result.all)
        lines.append(
            f"| {result.variant} | {len(samples)} | {_us(statistics.median(samples))} | "
            f"{_us(_percentile(samples, 0.9))} | {_us(samples[0])} | {_us(samples[-1])} |"
        )
    lines += [
        "",
        "| variant | floor | median / floor median | overhead µs | per-round ratio: median "
        "(min to max) |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        if result.floor is None:
            continue
        floor = by_name[result.floor]
        median = statistics.median(result.all)
        floor_median = statistics.median(floor.all)
        per_round = [statistics.median(mine) / statistics.median(theirs)
                     for mine, theirs in zip(result.rounds, floor.rounds, strict=True)]
        lines.append(
            f"| {result.variant} | {result.floor} | {median / floor_median:.2f} | "
            f"{_us(median - floor_median)} | "
            f"{statistics.median(per_round):.2f} ({min(per_round):.2f} to "
            f"{max(per_round):.2f}) |"
        )
    return "\n".join(lines)


def etcd_version() -> str:
    """The first line of ``etcd --version``, e.g. ``etcd Version: 3.5.1``."""
    try:
        binary = find_etcd_binary()
        output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return f"unknown ({exc})"
    first = output.strip().splitlines()[0] if output.strip() else "unknown"
    return f"{first.replace('etcd Version:', '').strip()} ({binary})"


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> list[str]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = f"{os.cpu_count()} CPUs" + (f" ({affinity} usable)" if affinity is not None else "")
    return [
        f"- machine: {cpus}, {platform.machine()}, {platform.platform()}",
        f"- python: {platform.python_implementation()} {platform.python_version()}",
        f"- etcd: {etcd_version()}, one member on loopback",
        f"- aetcd {_package_version('aetcd')}, grpcio {_package_version('grpcio')}, "
        f"torch {_package_version('torch')}",
    ]


def report(results: Sequence[Result], *, command: str, calls: int, rounds: int,
           warmup: int) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "\n".join([
        "# Backend call latency",
        "",
        f"- command: `{command}`",
        f"- date: {now}",
        *machine_description(),
        f"- state: {STATE_SIZE} random bytes ({STATE_SIZE + HEADER_SIZE} stored); "
        f"{calls} sequential calls per variant per round, {rounds} rounds, variant order "
        f"rotated each round; {warmup} warm-up calls per variant and the setup (lease grant) "
        "not measured",
        "- floors: `raw txn` is an aetcd Txn (compare mod_revision → put with a lease, else "
        "get), `raw get` an aetcd linearizable get; both from asyncio",
        "",
        format_tables(results),
        "",
        "Ratios are the variant's median over its floor's median; a per-round ratio compares "
        "the medians of one round (paired: the same minutes of machine load), and their "
        "median is the figure least moved by load that drifts during the run. Overhead is "
        "the variant's median minus its floor's. `set_state stale` is measured against the "
        "raw Txn that writes, though it writes nothing. The backend grants a lease at most "
        "once a minute: a run longer than that shows one grant in the max of a set_state "
        "variant. Timings on a shared machine are noisy: compare variants within one run only.",
        "",
    ])


def run(*, calls: int, rounds: int, warmup: int, output: Path, command: str) -> str:
    """Start etcd, measure, write the report to ``output`` and return it."""
    server = EtcdServer()
    try:
        server.start()
        results = measure(server.get_endpoint(), server.get_host(), server.get_port(),
                          calls=calls, rounds=rounds, warmup=warmup)
    finally:
        server.stop()
    text = report(results, command=command, calls=calls, rounds=rounds, warmup=warmup)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that ``finally`` stops etcd (it runs in its own session)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.backend_calls",
        description="Per-call latency of the etcd rendezvous backend against raw aetcd calls.",
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer calls: {QUICK[0]} per variant per round, {QUICK[1]} rounds")
    parser.add_argument("--calls", type=_positive, default=None,
                        help=f"calls per variant per round (default {FULL[0]})")
    parser.add_argument("--rounds", type=_positive, default=None,
                        help=f"rounds (default {FULL[1]})")
    parser.add_argument("--warmup", type=_non_negative, default=None,
                        help=f"unmeasured calls per variant first (default {FULL[2]})")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="the Markdown report (default: benchmarks/results/backend_calls.md)")
    args = parser.parse_args(args_list)
    calls, rounds, warmup = QUICK if args.quick else FULL
    calls = args.calls if args.calls is not None else calls
    rounds = args.rounds if args.rounds is not None else rounds
    warmup = args.warmup if args.warmup is not None else min(warmup, calls)
    command = shlex.join([sys.executable, "-m", "benchmarks.backend_calls", *args_list])
    with _exit_on_sigterm():
        text = run(calls=calls, rounds=rounds, warmup=warmup, output=args.output,
                   command=command)
    print(text)
    print(f"Written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
