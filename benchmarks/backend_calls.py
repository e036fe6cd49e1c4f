"""Per-call latency of the rendezvous backends, side by side with raw aetcd floors.

    python -m benchmarks.backend_calls [--quick] [--calls N] [--rounds R] [--warmup W]

One etcd (:class:`etcd_rdzv.testing.EtcdServer`, loopback, fsync on, v2 API enabled) serves
every etcd variant, each on its own key; a ``TCPStore`` served by this process serves c10d:

* ``raw txn`` (floor): an aetcd ``Txn`` (compare ``mod_revision`` → ``Put`` with a lease,
  else ``Range``), the token updated each time: the work of a successful CAS.
* ``raw txn stale`` (floor): the same ``Txn`` with a stale revision: the compare fails and
  the ``Range`` returns the current value; the work of a conflicted CAS.
* ``raw get`` (floor): an aetcd linearizable ``get``.
* ``async get_state``, ``async set_state`` (CAS that succeeds), ``async set_state stale``
  (the conflict path: one ``Txn`` that returns the current state), awaited on asyncio.
* ``shim ...``: the same three through the sync :class:`EtcdRendezvousBackend` (torch's
  interface), called from the main thread while its coroutines run on the portal's loop
  thread.
* ``etcd-v2 ...``: torch's ``EtcdRendezvousBackend`` (python-etcd, HTTP/JSON, base64), on
  the same etcd through its v2 API; skipped, with a note, when python-etcd is missing.
* ``c10d ...``: torch's ``C10dRendezvousBackend`` over a ``TCPStore`` client.

Each round runs every variant for ``--calls`` sequential calls, the order rotated from round
to round so that machine noise falls on all of them alike. The asyncio variants run on one
event loop of the main thread, driven only during their own phase, so the sync variants are
always called from a thread with no running loop. Setup and ``--warmup`` calls (the first
``set_state`` grants a lease) are not measured. Nothing about the timings is asserted: the
machine may be shared and noisy.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend

from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, EtcdConfig
from etcd_rdzv.codec import HEADER_SIZE
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.elastic import EtcdRendezvousBackend

from . import _backends, _plots
from ._backends import C10D, ETCD_V2, BenchServers
from ._common import Loop, Topic, Verdict, markdown_table, option, percentile

__all__ = ["TOPIC", "CallResults", "Settings", "measure"]

STATE_SIZE = 300
KEY_PREFIX = "/etcd-rdzv-bench"
#: Per-RPC deadline of the raw client (aetcd's default, None, waits forever on a hung server).
RAW_TIMEOUT = 5.0
#: The backend's lease is ttl + window (7200 + 60 s by default); the raw floor's put too.
RAW_LEASE_TTL = 7260
#: The targets: the shim's ceiling over the raw floor, the conflict path's floor over etcd-v2.
SHIM_FLOOR_TARGET = 1.2
CONFLICT_SPEEDUP_TARGET = 2.0


@dataclass(frozen=True)
class Settings:
    # Many short rounds interleave better than a few long ones on a machine whose load drifts.
    calls: int = option(100, "sequential calls per variant per round")
    rounds: int = option(15, "rounds, the variant order rotated each round")
    warmup: int = option(30, "unmeasured calls per variant first", low=0)


QUICK = Settings(calls=30, rounds=4, warmup=10)

RAW_TXN, RAW_STALE, RAW_GET = "raw txn", "raw txn stale", "raw get"
GET, SET, STALE = "get_state", "set_state", "set_state stale"
OPS = (GET, SET, STALE)
#: The comparison table's columns: (family, heading).
FAMILIES = (("raw", "raw aetcd floor"), ("etcd-v3 async", "etcd-v3 async"),
            ("etcd-v3 shim", "etcd-v3 shim"), (ETCD_V2, "etcd-v2"), (C10D, "c10d"))


class BenchmarkError(RuntimeError):
    """A call did not do what the variant measures (a CAS that failed, a missing key)."""


class Variant:
    """One kind of call; ``floor`` names the raw variant its ratio is taken against."""

    name: str
    floor: str | None = None
    family: str
    op: str
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
    name, family, op = RAW_TXN, "raw", SET

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

    async def _txn(self, token: int) -> tuple[bool, Any]:
        tx = self._client.transactions  # compare objects are mutated by ==: fresh ones
        ok, responses = await self._client.transaction(
            compare=[tx.mod(self._key) == token],
            success=[tx.put(self._key, self._value, lease=self._lease_id)],
            failure=[tx.get(self._key)],
        )
        return bool(ok), responses

    async def acall(self) -> None:
        ok, responses = await self._txn(self._token)
        if not ok:
            raise BenchmarkError(f"The raw CAS on {self._key!r} failed.")
        self._token = int(responses[0].response_put.header.revision)


class RawTxnStale(RawTxn):
    """The same Txn with a stale revision: the compare fails, the Range answers."""

    name, family, op = RAW_STALE, "raw", STALE

    async def asetup(self) -> None:
        await super().asetup()
        stale = self._token
        await super().acall()  # the key moves on; the first token is stale from now on
        self._token = stale

    async def acall(self) -> None:
        ok, responses = await self._txn(self._token)
        if ok or not responses:
            raise BenchmarkError(f"The stale raw CAS on {self._key!r} did not fail.")


class RawGet(AsyncVariant):
    name, family, op = RAW_GET, "raw", GET

    def __init__(self, client: Any, key: bytes, value: bytes) -> None:
        self._client, self._key, self._value = client, key, value

    async def asetup(self) -> None:
        await self._client.put(self._key, self._value)

    async def acall(self) -> None:
        if await self._client.get(self._key) is None:
            raise BenchmarkError(f"The key {self._key!r} is missing.")


class AsyncGet(AsyncVariant):
    name, floor, family, op = "async get_state", RAW_GET, "etcd-v3 async", GET

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
    name, floor, family, op = "async set_state", RAW_TXN, "etcd-v3 async", SET

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
    name, floor, family, op = "async set_state stale", RAW_STALE, "etcd-v3 async", STALE

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


class SyncGet(SyncVariant):
    """``get_state`` through torch's interface (the etcd-v3 shim, etcd-v2, c10d)."""

    op = GET

    def __init__(self, family: str, name: str, floor: str | None,
                 backend: RendezvousBackend, state: bytes) -> None:
        self.family, self.name, self.floor = family, name, floor
        self._backend, self._state = backend, state

    def setup(self) -> None:
        result = self._backend.set_state(self._state, None)
        if result is None or not result[2]:
            raise BenchmarkError(f"{self.name}: creating the state failed.")

    def call(self) -> None:
        if self._backend.get_state() is None:
            raise BenchmarkError(f"{self.name}: the state is missing.")


class SyncSet(SyncGet):
    op = SET
    _token: Any = None

    def setup(self) -> None:
        self.call()  # creates the state (token None); etcd-v3 grants its lease

    def call(self) -> None:
        result = self._backend.set_state(self._state, self._token)
        if result is None or not result[2]:
            raise BenchmarkError(f"{self.name}: a CAS with the current token failed.")
        self._token = result[1]


class SyncSetStale(SyncGet):
    """A write with a stale token: the state written differs from the current one (c10d
    decides success by comparing the two)."""

    op = STALE
    _stale: Any = None
    _current: Any = None

    def setup(self) -> None:
        first = self._backend.set_state(self._state, None)
        if first is None or not first[2]:
            raise BenchmarkError(f"{self.name}: creating the state failed.")
        second = self._backend.set_state(self._state[::-1], first[1])
        if second is None or not second[2]:
            raise BenchmarkError(f"{self.name}: updating the state failed.")
        self._stale, self._current = first[1], second[1]

    def call(self) -> None:
        result = self._backend.set_state(self._state, self._stale)
        if result is None or result[2] or result[1] != self._current:
            raise BenchmarkError(f"{self.name}: a stale CAS did not return the current "
                                 f"state: {result!r}")


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


@dataclass(frozen=True)
class Result:
    """The latencies of one variant, in ns, one list per round."""

    variant: str
    floor: str | None
    rounds: list[list[int]]
    family: str = ""
    op: str = ""

    @property
    def all(self) -> list[int]:
        return [sample for samples in self.rounds for sample in samples]

    @property
    def median(self) -> float:
        return float(statistics.median(self.all))


@dataclass(frozen=True)
class CallResults:
    """Every variant's latencies, the settings, and the variants that could not run."""

    results: list[Result]
    calls: int
    rounds: int
    warmup: int
    skipped: dict[str, str] = field(default_factory=dict)

    def get(self, family: str, op: str) -> Result | None:
        return next((r for r in self.results if r.family == family and r.op == op), None)

    def by_name(self, name: str) -> Result:
        return next(r for r in self.results if r.variant == name)


def paired_ratios(mine: Result, theirs: Result) -> list[float]:
    """Per round, the ratio of the two variants' medians (the same minutes of load)."""
    return [statistics.median(a) / statistics.median(b)
            for a, b in zip(mine.rounds, theirs.rounds, strict=True)]


def measure(servers: BenchServers, *, calls: int, rounds: int, warmup: int,
            c10d: bool = True) -> CallResults:
    """Set up every variant on ``servers`` and time them in rotated rounds."""
    endpoint = servers.etcd_endpoint
    run_tag = uuid.uuid4().hex[:8]
    state = os.urandom(STATE_SIZE)
    stored = os.urandom(STATE_SIZE + HEADER_SIZE)  # what the backend stores: same size
    config = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=30.0,
                        request_timeout=RAW_TIMEOUT, connect_timeout=10.0)
    loop = Loop()
    raw = aetcd.Client(servers.etcd.get_host(), servers.etcd.get_port(), timeout=RAW_TIMEOUT)
    client = EtcdClient(config)
    shim_client = EtcdClient(config)
    skipped: dict[str, str] = {}
    torch_backends: list[RendezvousBackend] = []
    shims: list[EtcdRendezvousBackend] = []

    def backend(variant: str) -> AsyncEtcdRendezvousBackend:
        return AsyncEtcdRendezvousBackend(client, f"{run_tag}-{variant}", key_prefix=KEY_PREFIX)

    def shim(variant: str) -> SyncVariant:
        cls = {GET: SyncGet, SET: SyncSet, STALE: SyncSetStale}[variant]
        floor = {GET: RAW_GET, SET: RAW_TXN, STALE: RAW_STALE}[variant]
        key = f"{run_tag}-shim-{variant.replace(' ', '-').replace('_', '-')}"
        shims.append(EtcdRendezvousBackend(
            AsyncEtcdRendezvousBackend(shim_client, key, key_prefix=KEY_PREFIX)))
        return cls("etcd-v3 shim", f"shim {variant}", floor, shims[-1], state)

    def torch_variants(kind: str) -> list[Variant]:
        made: list[Variant] = []
        for op, cls in ((GET, SyncGet), (SET, SyncSet), (STALE, SyncSetStale)):
            run_id = f"{run_tag}-{kind}-{op.replace(' ', '-').replace('_', '-')}"
            params = _backends.parameters(kind, servers.endpoint(kind), run_id,
                                          config={"read_timeout": 30})
            made_backend, _store = _backends.create_backend(kind, params)
            torch_backends.append(made_backend)
            made.append(cls(kind, f"{kind} {op}", None, made_backend, state))
        return made

    variants: list[Variant] = [
        RawTxn(raw, f"{KEY_PREFIX}/{run_tag}-raw-txn".encode(), stored),
        RawTxnStale(raw, f"{KEY_PREFIX}/{run_tag}-raw-txn-stale".encode(), stored),
        RawGet(raw, f"{KEY_PREFIX}/{run_tag}-raw-get".encode(), stored),
        AsyncGet(backend("async-get"), state),
        AsyncSet(backend("async-set"), state),
        AsyncSetStale(backend("async-set-stale"), state),
        shim(GET), shim(SET), shim(STALE),
    ]
    shim_used = False  # the shims' client, shared by all three, lives on the portal's loop
    try:
        reason = _backends.v2_unavailable()
        if reason is None:
            variants += torch_variants(ETCD_V2)
        else:
            skipped[ETCD_V2] = reason
        if c10d:
            variants += torch_variants(C10D)
        else:
            skipped[C10D] = "not asked for"
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
        return CallResults(
            [Result(v.name, v.floor, samples[v.name], v.family, v.op) for v in variants],
            calls, rounds, warmup, skipped)
    finally:
        try:
            with contextlib.suppress(Exception):
                loop.run(client.close())
            with contextlib.suppress(Exception):
                loop.run(raw.close())
            if shim_used:
                with contextlib.suppress(Exception):
                    shims[0].close()
            for made in torch_backends:
                with contextlib.suppress(Exception):
                    _backends.close_backend(made)
        finally:
            loop.close()


def _us(ns: float) -> str:
    return f"{ns / 1000:,.1f}"


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f} to {max(ratios):.2f})"


def _ratio_cell(mine: Result | None, theirs: Result | None) -> str:
    return "n/a" if mine is None or theirs is None else _spread(paired_ratios(mine, theirs))


def fragments(results: CallResults) -> dict[str, str]:
    """The settings, the comparison table, the latency table and the ratio-to-floor table."""
    comparison = []
    for op in OPS:
        cells: list[object] = [f"`{op}`"]
        for family, _heading in FAMILIES:
            result = results.get(family, op)
            cells.append(_us(result.median) if result is not None else "n/a")
        shim = results.get("etcd-v3 shim", op)
        cells += [_ratio_cell(shim, results.get("raw", op)),
                  _ratio_cell(results.get(ETCD_V2, op), shim),
                  _ratio_cell(results.get(C10D, op), shim)]
        comparison.append(cells)
    latency = []
    for result in results.results:
        samples = sorted(result.all)
        latency.append([result.variant, len(samples), _us(statistics.median(samples)),
                        _us(percentile(samples, 0.9)), _us(samples[0]), _us(samples[-1])])
    ratios = []
    for result in results.results:
        if result.floor is not None:
            floor = results.by_name(result.floor)
            ratios.append([result.variant, result.floor, f"{result.median / floor.median:.2f}",
                           _us(result.median - floor.median),
                           _spread(paired_ratios(result, floor))])
    settings = (f"- state: {STATE_SIZE} random bytes ({STATE_SIZE + HEADER_SIZE} stored by "
                f"etcd-v3, {(STATE_SIZE + 2) // 3 * 4} base64 bytes by etcd-v2 and c10d); "
                f"{results.calls} sequential calls per variant per round, {results.rounds} "
                f"rounds, variant order rotated each round; {results.warmup} warm-up calls per "
                "variant and the setup (lease grant) not measured")
    return {
        "settings": "\n".join([settings, *(f"- skipped: {kind}: {why}"
                                           for kind, why in results.skipped.items())]),
        "comparison": markdown_table(
            ["call", *(f"{heading} µs" for _, heading in FAMILIES), "shim / floor",
             "etcd-v2 / shim", "c10d / shim"], comparison),
        "latency": markdown_table(
            ["variant", "calls", "median µs", "p90 µs", "min µs", "max µs"], latency),
        "ratios": markdown_table(
            ["variant", "floor", "median / floor median", "overhead µs",
             "per-round ratio: median (min to max)"], ratios, "llrrr"),
    }


def _ratio(mine: Result | None, theirs: Result | None) -> float | None:
    return None if mine is None or theirs is None \
        else statistics.median(paired_ratios(mine, theirs))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def verdicts(results: CallResults) -> list[Verdict]:
    """The shim's ceiling over the raw floor; the conflict path's speed-up over etcd-v2."""
    get, put, stale = (_ratio(results.get("etcd-v3 shim", op), results.get("raw", op))
                       for op in OPS)
    known = [r for r in (get, put) if r is not None]
    worst = max(known) if known else None
    speedup = _ratio(results.get(ETCD_V2, STALE), results.get("etcd-v3 shim", STALE))
    return [
        Verdict("shim", f"sync shim within {SHIM_FLOOR_TARGET}x of the raw aetcd floor per call",
                f"get_state {_fmt(get)}, set_state {_fmt(put)} (conflicting set_state "
                f"{_fmt(stale)})", None if worst is None else worst <= SHIM_FLOOR_TARGET,
                "" if worst is None else
                f"{(worst / SHIM_FLOOR_TARGET - 1) * 100:.0f}% over the "
                f"{SHIM_FLOOR_TARGET:g}x ceiling"),
        Verdict("conflict", f"set_state on conflict at least {CONFLICT_SPEEDUP_TARGET:g}x "
                "faster than etcd-v2", f"etcd-v2 / etcd-v3 shim: {_fmt(speedup)}",
                None if speedup is None else speedup >= CONFLICT_SPEEDUP_TARGET,
                "" if speedup is None else
                f"{(1 - speedup / CONFLICT_SPEEDUP_TARGET) * 100:.0f}% short of the "
                f"{CONFLICT_SPEEDUP_TARGET:g}x floor"),
    ]


def facts(results: CallResults) -> dict[str, str]:
    """Medians the notes on missed targets quote: ``shim_get``, ``v2_stale``, ..."""
    found: dict[str, str] = {}
    medians: dict[str, float] = {}
    for key, family in (("v2", ETCD_V2), ("raw", "raw"), ("shim", "etcd-v3 shim")):
        for suffix, op in (("get", GET), ("set", SET), ("stale", STALE)):
            result = results.get(family, op)
            if result is not None:
                medians[f"{key}_{suffix}"] = result.median
                found[f"{key}_{suffix}"] = f"{result.median / 1000:,.0f} µs"
    if "v2_stale" in medians and "raw_stale" in medians:
        found["floor_ratio"] = f"{medians['v2_stale'] / medians['raw_stale']:.2f}x"
    return found


def plot(results: CallResults, directory: Path) -> list[Path]:
    """A bar per family and call: median µs, whiskers from min to max, log scale."""
    plt = _plots.pyplot()
    figure, axes = plt.subplots(figsize=(8.5, 4.2))
    width = 0.16
    for index, (family, heading) in enumerate(FAMILIES):
        xs, medians, lows, highs = [], [], [], []
        for position, op in enumerate(OPS):
            result = results.get(family, op)
            if result is None:
                continue
            samples = sorted(result.all)
            median = statistics.median(samples) / 1000
            xs.append(position + (index - 2) * width)
            medians.append(median)
            lows.append(median - samples[0] / 1000)
            highs.append(samples[-1] / 1000 - median)
        if xs:
            axes.bar(xs, medians, width, label=heading,
                     color=_plots.COLORS.get(family, "#333333"),
                     yerr=[lows, highs], capsize=2, error_kw={"elinewidth": 0.8})
    axes.set_yscale("log")
    axes.set_xticks(range(len(OPS)), [f"{op}" for op in OPS])
    axes.set_ylabel("µs per call (median; whiskers: min to max)")
    axes.set_title(f"Backend call latency ({results.rounds} rounds of {results.calls} calls)")
    axes.legend(fontsize=8, ncols=3)
    return [_plots.save(figure, directory / "backend_calls.png")]


def collect(settings: Settings, progress: Callable[[str], None]) -> CallResults:
    """Start etcd (v2 API on) and a TCPStore, measure, stop them."""
    with BenchServers() as servers:
        return measure(servers, calls=settings.calls, rounds=settings.rounds,
                       warmup=settings.warmup)


TOPIC: Topic[Settings, CallResults] = Topic(
    "calls", __name__, Settings(), QUICK, collect, fragments, plot, verdicts, facts)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
