"""N agents join one rendezvous in one process: the native rendezvous as coroutines against
etcd's own floor, and torch's handler as threads, over etcd-v3 and over c10d.

    python -m benchmarks.join_scale [--quick] [--sizes 100 1000 10000] [--trials 3]
                                    [--thread-sizes 10 40 100 300 1000] [--cap 60]
                                    [--connections 8] [--keep-alive-interval 30]

One etcd on loopback (fsync on) and a ``TCPStore`` served by this process; min_nodes =
max_nodes = N everywhere, and every harness is checked: each rank 0..N-1 held once, one
world size N.

* **native**: N :class:`~etcd_rdzv.AsyncNativeRendezvous` nodes, coroutines of one event loop,
  over ``--connections`` :class:`~etcd_rdzv.EtcdClient` s (the nodes of one client share its
  one watch of the run's ``ctl/`` keys); named like hosts, ``node-000123.cluster.example.com``.
  Nothing is set up beforehand: the clock starts when all of them call ``next_rendezvous()``
  (which grants each node's lease) and stops when the last one holds its rank. Then every
  node leaves (revokes its lease), not timed.
* **etcd's floor**, raw gRPC (aetcd's generated stubs: no retry, no deadline bookkeeping),
  over as many connections: *joins*, N lease grants each followed by a put of a join key (the
  native's key and value sizes) under it, all at once; *fan-out*, N watchers of one key
  (spread over one watch stream per connection), then one put of a seal-sized value, until
  every watcher has its event. The floor of a rendezvous is their sum.
* **native's requests, raw**: the same raw client replays what the native nodes ask of etcd,
  to show where their time goes: *joins*, a grant and then the join ``Txn`` (the put, and
  count-only ranges of this round and the one before); *ranks*, the count-only ``Range``
  of the join keys before one's own at the sealing revision.
* **torch's handler as threads**: N ``DynamicRendezvousHandler`` s, one per thread, over
  etcd-v3 (each its own backend and store, over ``--connections`` shared clients, as one
  process's handlers share the portal's event loop) and over c10d (a ``TCPStore`` client per
  thread: a client serializes its calls and its blocking ``get`` holds it, so threads cannot
  share one). Sizes in ascending order until one does not rank within ``--cap`` seconds
  (torch's ``join_timeout``): that is where the harness stops, and the report says so.

The native trial and the two raw blocks alternate, their order rotated each trial; torch's
harnesses run once per size. ``keep_alive_interval`` is ``--keep-alive-interval`` (30 s: a
TTL of 90 s) for the native nodes and torch's handlers alike, so that no heartbeat lands
inside a measurement; the steady-state topic measures heartbeats. What etcd did comes from
etcd itself (:mod:`._probe`): revisions, gRPC bytes in and out, watch events sent, its CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import random
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc, utils

from etcd_rdzv import (
    Admission,
    AsyncEtcdRendezvousBackend,
    AsyncEtcdStore,
    AsyncNativeRendezvous,
    Deadline,
    EtcdClient,
    EtcdConfig,
    NativeSettings,
    NodeId,
    RunKeys,
)
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.native import Seal

from . import _backends, _plots
from ._backends import C10D, ETCD_V3, BenchServers, CallCounts, CountingBackend
from ._common import Loop, Spread, Topic, Verdict, markdown_table, option
from ._probe import EtcdDelta, EtcdProbe

__all__ = ["TOPIC", "JoinScaleResults", "Measurement", "Settings", "collect"]

KEY_PREFIX = "/etcd-rdzv-bench"
#: Bounds on one native trial and on each raw call; a rendezvous this slow has failed.
JOIN_TIMEOUT = 600.0
RAW_TIMEOUT = 120.0
#: etcd's answer when too many proposals wait to be applied; the raw client pauses up to this
#: many seconds and resends.
TOO_MANY_REQUESTS = "too many requests"
RAW_RETRY_PAUSE = 0.05
#: The targets: N agents ranked within this many seconds, within this multiple of etcd's floor.
TARGET_N = 10_000
TARGET_SECONDS = 10.0
FLOOR_MULTIPLE = 2.0
#: At most this many etcd writes per node per round (its join, its leave), besides the seal.
WRITES_PER_NODE = 2

NATIVE = "native"
FLOOR_JOINS = "floor: grants + puts"
FLOOR_FANOUT = "floor: fan-out"
RAW_JOINS = "native's joins, raw"
RAW_RANKS = "native's ranks, raw"
TORCH_V3 = "torch's handler, etcd-v3"
TORCH_C10D = "torch's handler, c10d"
TORCH_KINDS = {TORCH_V3: ETCD_V3, TORCH_C10D: C10D}


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = option((100, 1000, 10_000), "native agents N (coroutines)")
    thread_sizes: tuple[int, ...] = option(
        (10, 40, 100, 300, 1000), "torch's handlers N (threads), ascending until one misses "
        "the cap")
    cap: float = option(60.0, "seconds torch's handlers may take (their join_timeout)")
    connections: int = option(8, "etcd connections the agents share")
    trials: int = option(3, "trials per native size (each with the raw floors)")
    keep_alive_interval: float = option(30.0, "keep_alive_interval of every agent, seconds")


QUICK = Settings(sizes=(100, 1000, 10_000), thread_sizes=(10, 100), cap=30.0, trials=1)


@dataclass(frozen=True)
class Measurement:
    """One harness at one N, once."""

    harness: str
    n: int
    trial: int
    seconds: float
    """Until the last agent held its rank (a floor: until its last operation completed)."""
    done: int
    """Agents that held a rank (operations that completed)."""
    etcd: EtcdDelta | None
    client_cpu: float
    """This process's CPU seconds during the measurement (every thread)."""
    sealed: float | None = None
    """native: seconds from the start until the round was sealed (the seal's own stamp)."""
    median: float | None = None
    """native and torch: the median agent's seconds."""
    shared_writes: int = 0
    """native: the run's shared keys written in the round (the seal, the run lease's key)."""
    seals: int = 0
    """native: the seals written in the round."""
    leave: EtcdDelta | None = None
    """native: what the nodes' leaving cost etcd."""
    calls: CallCounts | None = None
    """torch: every handler's backend calls, summed."""
    refused: int = 0
    """raw: requests etcd refused as "too many requests", resent."""
    retries: Counter[str] = field(default_factory=Counter)
    """native: the client's retried requests, by kind (``Joining``, ``Granting``, ...): a
    request whose attempt outlived ``request_timeout`` is sent again, and a join sent again
    after its first attempt landed writes the node's key twice."""
    failure: str = ""

    @property
    def ok(self) -> bool:
        return self.done == self.n and not self.failure

    @property
    def join_writes(self) -> float | None:
        """Revisions per node while joining, the shared writes left out."""
        if self.etcd is None:
            return None
        return (self.etcd.revisions - self.shared_writes) / self.n

    @property
    def round_writes(self) -> float | None:
        """Revisions per node in the whole round (join and leave), shared writes left out."""
        join = self.join_writes
        if join is None:
            return None
        return join + (self.leave.revisions / self.n if self.leave is not None else 0.0)


@dataclass
class JoinScaleResults:
    measurements: list[Measurement] = field(default_factory=list)
    sizes: tuple[int, ...] = ()
    thread_sizes: tuple[int, ...] = ()
    cap: float = 0.0
    connections: int = 0
    trials: int = 0
    keep_alive_interval: float = 0.0
    elapsed_seconds: float = 0.0

    def of(self, harness: str, n: int) -> list[Measurement]:
        return sorted((m for m in self.measurements if m.harness == harness and m.n == n),
                      key=lambda m: m.trial)

    def seconds(self, harness: str, n: int) -> Spread | None:
        found = [m.seconds for m in self.of(harness, n) if m.ok]
        return Spread.of(found) if found else None

    def floor(self, n: int) -> Spread | None:
        """etcd's floor of a rendezvous per trial: joins plus fan-out."""
        joins = {m.trial: m.seconds for m in self.of(FLOOR_JOINS, n)}
        fans = {m.trial: m.seconds for m in self.of(FLOOR_FANOUT, n)}
        found = [joins[t] + fans[t] for t in joins if t in fans]
        return Spread.of(found) if found else None

    def over_floor(self, n: int) -> Spread | None:
        """Per trial, the native's time over the floor measured beside it."""
        joins = {m.trial: m.seconds for m in self.of(FLOOR_JOINS, n)}
        fans = {m.trial: m.seconds for m in self.of(FLOOR_FANOUT, n)}
        ratios = [m.seconds / (joins[m.trial] + fans[m.trial]) for m in self.of(NATIVE, n)
                  if m.ok and m.trial in joins and m.trial in fans]
        return Spread.of(ratios) if ratios else None

    def typical(self, harness: str, n: int) -> Measurement | None:
        """The trial of median time (the lower middle one of an even count)."""
        found = sorted(self.of(harness, n), key=lambda m: m.seconds)
        return found[(len(found) - 1) // 2] if found else None

    def reached(self, harness: str) -> tuple[int | None, Measurement | None]:
        """torch's harness: the largest N that ranked, and the first that did not."""
        runs = sorted((m for m in self.measurements if m.harness == harness),
                      key=lambda m: m.n)
        largest = max((m.n for m in runs if m.ok), default=None)
        return largest, next((m for m in runs if not m.ok), None)


# --- names, keys, values ------------------------------------------------------------------


def node_id(index: int) -> NodeId:
    """Agent ``index``, named like a host of a cluster (the names sort by index)."""
    return NodeId(f"node-{index:06d}.cluster.example.com", 10_000 + index, 0)


def join_value() -> bytes:
    """A join key's value, as large as the native node writes it."""
    return json.dumps({"joined_at": time.time()}).encode()


def spread_over(n: int, parts: int) -> list[int]:
    """``n`` as ``parts`` counts that differ by at most one."""
    return [n // parts + (1 if index < n % parts else 0) for index in range(parts)]


class RendezvousError(RuntimeError):
    """The agents did not end in one rendezvous with every rank held once."""


def check_ranks(label: str, n: int, admissions: Sequence[Admission]) -> None:
    ranks = sorted(a.rank for a in admissions)
    sizes = {a.world_size for a in admissions}
    rounds = {a.round for a in admissions}
    if ranks != list(range(n)) or sizes != {n} or len(rounds) != 1:
        raise RendezvousError(f"{label}, N={n}: ranks {ranks[:8]}..., world sizes "
                              f"{sorted(sizes)}, rounds {sorted(rounds)}: not one rendezvous")


# --- the native harness -------------------------------------------------------------------


class RetryCounter(logging.Handler):
    """Counts the retries :class:`~etcd_rdzv.EtcdClient` logs (at debug level), by the first
    word of what was retried, while installed with :meth:`installed`."""

    LOGGER = "etcd_rdzv._connection"

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "retrying %s: %s" and record.args:
            what = record.args[0] if isinstance(record.args, tuple) else ""
            self.counts[str(what).split(" ", 1)[0]] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[RetryCounter]:
        logger = logging.getLogger(self.LOGGER)
        level, propagate = logger.level, logger.propagate
        logger.addHandler(self)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # debug records stay here
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


async def native_trial(clients: Sequence[EtcdClient], probe: EtcdProbe, n: int,
                       keep_alive_interval: float, trial: int) -> Measurement:
    """N native nodes over ``clients`` rendezvous once, then leave; checked."""
    keys = RunKeys(f"scale-{uuid.uuid4().hex[:12]}", KEY_PREFIX)
    settings = NativeSettings(n, n, join_timeout=JOIN_TIMEOUT,
                              keep_alive_interval=keep_alive_interval)
    nodes = [AsyncNativeRendezvous(clients[index % len(clients)], keys, settings,
                                   node_id(index)) for index in range(n)]
    finished = [0.0] * n
    gc.collect()
    before = probe.sample()
    cpu, wall, started = time.process_time(), time.time(), time.perf_counter()

    async def join(index: int) -> Admission:
        admission = await nodes[index].next_rendezvous()
        finished[index] = time.perf_counter() - started
        return admission

    with RetryCounter().installed() as retries:
        admissions = await asyncio.gather(*(join(index) for index in range(n)))
    cpu = time.process_time() - cpu
    after = probe.sample()
    check_ranks(NATIVE, n, admissions)
    deadline = Deadline.after(RAW_TIMEOUT)
    control = await clients[0].get_prefix(keys.control_prefix, deadline)
    shared = sum(1 for kv in control.kvs if kv.create_revision > before.revision)
    seals = [Seal.decode(bytes(kv.value)) for kv in control.kvs
             if bytes(kv.key).startswith(keys.seal_prefix)]
    await asyncio.gather(*(node.leave() for node in nodes))
    left = probe.sample()
    await clients[0].delete(keys.run_prefix, deadline, prefix=True)
    return Measurement(NATIVE, n, trial, max(finished), n, after - before, cpu,
                       sealed=seals[0].sealed_at - wall if seals else None,
                       median=statistics.median(finished), shared_writes=shared,
                       seals=len(seals), leave=left - after, retries=retries.counts)


# --- etcd's floor, and the native's own requests, on a raw client -------------------------


class RawEtcd:
    """``connections`` gRPC channels to etcd with aetcd's generated stubs, nothing else.

    One thing is retried, as any client must: etcd's "too many requests", which it answers
    before proposing anything when its applied index lags the committed one by 5,000 entries
    (10,000 grants at once get there); :attr:`refused` counts them.
    """

    def __init__(self, endpoint: str, connections: int) -> None:
        self.channels = [grpc.aio.insecure_channel(endpoint) for _ in range(connections)]
        self.kv = [rpc.KVStub(channel) for channel in self.channels]
        self.leases = [rpc.LeaseStub(channel) for channel in self.channels]
        self.watches = [rpc.WatchStub(channel) for channel in self.channels]
        self.refused = 0

    async def call(self, method: Callable[..., Awaitable[Any]], request: Any) -> Any:
        while True:
            try:
                return await method(request, timeout=RAW_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if TOO_MANY_REQUESTS not in (exc.details() or ""):
                    raise
                self.refused += 1
            await asyncio.sleep(random.uniform(0.0, RAW_RETRY_PAUSE))

    def kv_of(self, index: int) -> Any:
        return self.kv[index % len(self.kv)]

    def lease_of(self, index: int) -> Any:
        return self.leases[index % len(self.leases)]

    async def grant(self, index: int, ttl: int) -> int:
        response = await self.call(self.lease_of(index).LeaseGrant,
                                   rpc.LeaseGrantRequest(TTL=ttl))
        return int(response.ID)

    async def cleanup(self, prefix: bytes, leases: Sequence[int]) -> None:
        """Delete the keys, then revoke the leases (else they expire during later runs)."""
        await self.call(self.kv[0].DeleteRange, rpc.DeleteRangeRequest(
            key=prefix, range_end=utils.prefix_range_end(prefix)))
        await asyncio.gather(*(self.call(self.lease_of(i).LeaseRevoke,
                                         rpc.LeaseRevokeRequest(ID=lease))
                               for i, lease in enumerate(leases)))

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)


async def _timed(raw: RawEtcd, probe: EtcdProbe, harness: str, n: int, trial: int,
                 work: Callable[[], Awaitable[None]]) -> Measurement:
    gc.collect()
    before, refused = probe.sample(), raw.refused
    cpu, started = time.process_time(), time.perf_counter()
    await work()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Measurement(harness, n, trial, seconds, n, probe.sample() - before, cpu,
                       refused=raw.refused - refused)


async def floor_trial(raw: RawEtcd, probe: EtcdProbe, n: int, ttl: int,
                      trial: int) -> list[Measurement]:
    """etcd's floor: N grants + puts, then one seal-sized put fanned out to N watchers."""
    keys = RunKeys(f"floor-{uuid.uuid4().hex[:12]}", KEY_PREFIX)
    leases = [0] * n

    async def join(index: int) -> None:
        leases[index] = lease = await raw.grant(index, ttl)
        await raw.call(raw.kv_of(index).Put, rpc.PutRequest(
            key=keys.member(1, node_id(index).name), value=join_value(), lease=lease))

    async def joins() -> None:
        await asyncio.gather(*(join(index) for index in range(n)))

    measured = [await _timed(raw, probe, FLOOR_JOINS, n, trial, joins)]
    measured.append(await fan_out(raw, probe, keys.seal(1), n, trial))
    await raw.cleanup(keys.run_prefix, leases)
    return measured


async def fan_out(raw: RawEtcd, probe: EtcdProbe, key: bytes, n: int,
                  trial: int) -> Measurement:
    """N watchers of ``key`` on one stream per connection; one put; until all have it."""
    streams = []
    for index, count in enumerate(spread_over(n, len(raw.watches))):
        if not count:
            continue
        stream = raw.watches[index].Watch()
        for _ in range(count):
            await stream.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=key)))
        created = 0
        while created < count:
            created += bool((await stream.read()).created)
        streams.append((stream, count))
    seal = Seal(1, 0, n, time.time(), str(node_id(0))).encode()

    async def drain(stream: Any, count: int) -> None:
        events = 0
        while events < count:
            events += len((await stream.read()).events)

    async def put_and_wait() -> None:
        readers = [asyncio.ensure_future(drain(stream, count)) for stream, count in streams]
        try:
            await raw.call(raw.kv[0].Put, rpc.PutRequest(key=key, value=seal))
            await asyncio.wait_for(asyncio.gather(*readers), RAW_TIMEOUT)
        finally:
            for reader in readers:
                reader.cancel()

    try:
        return await _timed(raw, probe, FLOOR_FANOUT, n, trial, put_and_wait)
    finally:
        for stream, _ in streams:
            stream.cancel()


async def replay_trial(raw: RawEtcd, probe: EtcdProbe, n: int, ttl: int,
                       trial: int) -> list[Measurement]:
    """The native nodes' own requests, raw: N grants + join Txns, then N rank counts."""
    keys = RunKeys(f"replay-{uuid.uuid4().hex[:12]}", KEY_PREFIX)
    members = [keys.member(1, node_id(index).name) for index in range(n)]
    leases = [0] * n

    def count(prefix: bytes) -> Any:
        return rpc.RequestOp(request_range=rpc.RangeRequest(
            key=prefix, range_end=utils.prefix_range_end(prefix), count_only=True))

    async def join(index: int) -> None:
        leases[index] = lease = await raw.grant(index, ttl)
        await raw.call(raw.kv_of(index).Txn, rpc.TxnRequest(
            compare=[rpc.Compare(key=keys.state, result=rpc.Compare.EQUAL,
                                 target=rpc.Compare.CREATE, create_revision=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                         key=members[index], value=join_value(), lease=lease)),
                     count(keys.round_prefix(1)), count(keys.round_prefix(0))]))

    async def joins() -> None:
        await asyncio.gather(*(join(index) for index in range(n)))

    measured = [await _timed(raw, probe, RAW_JOINS, n, trial, joins)]
    cutoff = int((await raw.call(raw.kv[0].Range,
                                 rpc.RangeRequest(key=keys.state))).header.revision)
    ranks = [-1] * n

    async def rank(index: int) -> None:
        response = await raw.call(raw.kv_of(index).Range, rpc.RangeRequest(
            key=keys.round_prefix(1), range_end=members[index], count_only=True,
            revision=cutoff, max_create_revision=cutoff))
        ranks[index] = int(response.count)

    async def all_ranks() -> None:
        await asyncio.gather(*(rank(index) for index in range(n)))

    measured.append(await _timed(raw, probe, RAW_RANKS, n, trial, all_ranks))
    if ranks != list(range(n)):
        raise RendezvousError(f"{RAW_RANKS}, N={n}: the counts are not the ranks 0..N-1")
    await raw.cleanup(keys.run_prefix, leases)
    return measured


# --- torch's handler as threads -----------------------------------------------------------


def torch_trial(harness: str, servers: BenchServers, clients: Sequence[EtcdClient],
                probe: EtcdProbe, n: int, settings: Settings) -> Measurement:
    """N of torch's handlers, one thread each, over etcd-v3 or c10d; checked."""
    from torch.distributed.elastic.rendezvous import RendezvousHandler, dynamic_rendezvous

    from etcd_rdzv.elastic import EtcdRendezvousBackend, EtcdStore

    kind = TORCH_KINDS[harness]
    run_id = f"scale-{uuid.uuid4().hex[:12]}"
    cap = max(1, math.ceil(settings.cap))
    config = {"join_timeout": cap, "close_timeout": cap,
              "keep_alive_interval": math.ceil(settings.keep_alive_interval)}
    params = _backends.parameters(kind, servers.endpoint(kind), run_id, min_nodes=n,
                                  max_nodes=n, config=config)
    handlers: list[RendezvousHandler] = []
    proxies: list[CountingBackend] = []
    for index in range(n):
        if kind == ETCD_V3:
            client = clients[index % len(clients)]
            core = AsyncEtcdRendezvousBackend(client, run_id, key_prefix=KEY_PREFIX)
            backend: Any = EtcdRendezvousBackend(core)
            store: Any = EtcdStore(AsyncEtcdStore(
                client, RunKeys(run_id, KEY_PREFIX).store_prefix, core.lease))
        else:
            backend, store = _backends.create_backend(kind, params)
        proxies.append(CountingBackend(backend))
        handlers.append(dynamic_rendezvous.create_handler(store, proxies[-1], params))
    outcomes: list[Admission | str] = ["did not return"] * n
    finished = [0.0] * n
    barrier = threading.Barrier(n + 1)

    def agent(index: int) -> None:
        barrier.wait()
        started = time.perf_counter()
        try:
            info = handlers[index].next_rendezvous()
        except Exception as exc:
            outcomes[index] = type(exc).__name__
            return
        finished[index] = time.perf_counter() - started
        outcomes[index] = Admission(0, info.rank, info.world_size)

    threads = [threading.Thread(target=agent, args=(index,), name=f"agent-{index}",
                                daemon=True) for index in range(n)]
    for thread in threads:
        thread.start()
    gc.collect()
    before = probe.sample()
    barrier.wait()
    cpu, started = time.process_time(), time.perf_counter()
    give_up_at = started + cap + 30.0
    for thread in threads:
        thread.join(max(0.0, give_up_at - time.perf_counter()))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    delta = probe.sample() - before if kind == ETCD_V3 else None
    admissions = [outcome for outcome in outcomes if isinstance(outcome, Admission)]
    times = [finished[i] for i, outcome in enumerate(outcomes) if isinstance(outcome, Admission)]
    failures = Counter(outcome for outcome in outcomes if isinstance(outcome, str))
    counts = CallCounts()
    for proxy in proxies:
        snapshot = proxy.snapshot()
        counts.gets += snapshot.gets
        counts.sets += snapshot.sets
        counts.conflicts += snapshot.conflicts
    _stop_handlers(handlers)
    failure = ""
    if failures:
        failure = f"{len(times)} of {n} ranked within {cap} s (" + ", ".join(
            f"{name}: {count}" for name, count in failures.most_common()) + ")"
    else:
        seconds = max(times)
        check_ranks(harness, n, admissions)
    return Measurement(harness, n, 0, seconds, len(times), delta, cpu,
                       median=statistics.median(times) if times else None, calls=counts,
                       failure=failure)


def _stop_handlers(handlers: Sequence[Any]) -> None:
    """``shutdown()`` every handler at once (it stops its heartbeat thread), bounded."""
    threads = [threading.Thread(target=handler.shutdown, daemon=True) for handler in handlers]
    for thread in threads:
        thread.start()
    give_up_at = time.monotonic() + 60.0
    for thread in threads:
        thread.join(max(0.0, give_up_at - time.monotonic()))


# --- the whole topic ----------------------------------------------------------------------


def _etcd_pid(servers: BenchServers) -> int | None:
    process = servers.etcd.member.process
    return None if process is None else process.pid


def _close_portal_clients(clients: Sequence[EtcdClient]) -> None:
    """Close clients bound to the portal's loop, through the sync face that owns that loop."""
    from etcd_rdzv.elastic import EtcdRendezvousBackend

    for client in clients:
        with contextlib.suppress(Exception):
            EtcdRendezvousBackend(AsyncEtcdRendezvousBackend(client, "closing")).close()


def collect(settings: Settings, say: Callable[[str], None]) -> JoinScaleResults:
    """Start etcd and a TCPStore; run every harness; stop them all."""
    started = time.monotonic()
    results = JoinScaleResults(sizes=tuple(sorted(settings.sizes)),
                               thread_sizes=tuple(sorted(settings.thread_sizes)),
                               cap=settings.cap, connections=settings.connections,
                               trials=settings.trials,
                               keep_alive_interval=settings.keep_alive_interval)
    ttl = NativeSettings(1, 1, keep_alive_interval=settings.keep_alive_interval).node_ttl
    everything = KEY_PREFIX.encode() + b"/"
    with BenchServers() as servers:
        probe = EtcdProbe(servers.etcd_endpoint, _etcd_pid(servers))
        config = EtcdConfig(endpoints=parse_endpoints(servers.etcd_endpoint), read_timeout=60)
        loop = Loop()
        clients = [EtcdClient(config) for _ in range(settings.connections)]
        portal_clients = [EtcdClient(config) for _ in range(settings.connections)]

        async def open_raw() -> RawEtcd:
            return RawEtcd(servers.etcd_endpoint, settings.connections)

        raw = loop.run(open_raw())

        async def step(name: str, n: int, trial: int) -> list[Measurement]:
            if name == NATIVE:
                return [await native_trial(clients, probe, n, settings.keep_alive_interval,
                                           trial)]
            if name == FLOOR_JOINS:
                return await floor_trial(raw, probe, n, ttl, trial)
            return await replay_trial(raw, probe, n, ttl, trial)

        try:
            for n in results.sizes:
                for trial in range(settings.trials):
                    names = [NATIVE, FLOOR_JOINS, RAW_JOINS]
                    shift = trial % len(names)
                    for name in names[shift:] + names[:shift]:
                        for measured in loop.run(step(name, n, trial)):
                            results.measurements.append(measured)
                            say(_progress(measured))
            for harness in TORCH_KINDS:
                for n in results.thread_sizes:
                    measured = torch_trial(harness, servers, portal_clients, probe, n, settings)
                    loop.run(clients[0].delete(everything, Deadline.after(RAW_TIMEOUT),
                                               prefix=True))
                    results.measurements.append(measured)
                    say(_progress(measured))
                    if not measured.ok:
                        break
        finally:
            _close_portal_clients(portal_clients)

            async def close() -> None:
                await raw.close()
                for client in clients:
                    await client.close()

            with contextlib.suppress(Exception):
                loop.run(close())
            loop.close()
    results.elapsed_seconds = time.monotonic() - started
    return results


def _progress(m: Measurement) -> str:
    text = f"join-scale: N={m.n:<6,} {m.harness:<26} trial {m.trial + 1}: {m.seconds:7.2f} s"
    if m.failure:
        return f"{text}; {m.failure}"
    if m.sealed is not None:
        text += f" (sealed at {m.sealed:.2f} s)"
    if m.join_writes is not None:
        text += f", {m.join_writes:.2f} writes per node"
    if m.etcd is not None and m.etcd.cpu_seconds is not None:
        text += f", etcd CPU {m.etcd.cpu_seconds:.1f} s, client CPU {m.client_cpu:.1f} s"
    if m.refused:
        text += f", {m.refused} refused and resent"
    if m.retries:
        text += ", client retries: " + ", ".join(f"{what} {count}"
                                                 for what, count in m.retries.most_common())
    return text


# --- the report ---------------------------------------------------------------------------


def _cell(spread: Spread | None, digits: int = 2) -> str:
    return "n/a" if spread is None else spread.format(digits=digits)


def _per_node(value: float | None, n: int, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value / n:,.{digits}f}"


def time_table(results: JoinScaleResults) -> str:
    rows = []
    for n in results.sizes:
        sealed = [m.sealed for m in results.of(NATIVE, n) if m.sealed is not None]
        rows.append([f"{n:,}", _cell(results.seconds(NATIVE, n)),
                     _cell(Spread.of(sealed)) if sealed else "n/a",
                     _cell(results.seconds(FLOOR_JOINS, n)),
                     _cell(results.seconds(FLOOR_FANOUT, n)), _cell(results.floor(n)),
                     _cell(results.over_floor(n)),
                     _cell(results.seconds(RAW_JOINS, n)), _cell(results.seconds(RAW_RANKS, n))])
    return markdown_table(["N", "native s", "native sealed at s", "floor: grants + puts s",
                           "floor: fan-out s", "floor s", "native / floor",
                           "native's joins, raw s", "native's ranks, raw s"], rows)


def etcd_table(results: JoinScaleResults) -> str:
    """What etcd did for each harness, per node, in the trial of median time."""
    rows = []
    harnesses = [NATIVE, FLOOR_JOINS, FLOOR_FANOUT, RAW_JOINS, RAW_RANKS, TORCH_V3]
    for harness in harnesses:
        for n in sorted({m.n for m in results.measurements if m.harness == harness}):
            m = results.typical(harness, n)
            if m is None or m.etcd is None:
                continue
            etcd = m.etcd
            writes = f"{m.join_writes:.2f}" if m.join_writes is not None else "n/a"
            if harness == FLOOR_FANOUT:
                writes = f"{etcd.revisions} in all"  # the one put that is fanned out
            if m.leave is not None:
                writes += f" + {m.leave.revisions / n:.2f}"
            rows.append([
                harness, f"{n:,}", writes,
                str(m.shared_writes) if harness == NATIVE else "",
                _per_node(etcd.count("bytes_in"), n), _per_node(etcd.count("bytes_out"), n),
                f"{etcd.count('events'):,.0f}", _per_node(etcd.count("ranges"), n, 2),
                "n/a" if etcd.cpu_seconds is None else f"{etcd.cpu_seconds:.1f}",
                f"{m.client_cpu:.1f}", f"{m.refused + sum(m.retries.values()):,}",
                f"{m.seconds:.2f}" + ("" if m.ok else " (failed)"),
            ])
    return markdown_table(["harness", "N", "etcd writes per node", "shared writes",
                           "bytes to etcd per node", "bytes from etcd per node",
                           "watch events sent", "reads per node", "etcd CPU s",
                           "client CPU s", "requests resent", "seconds"], rows,
                          "lrrrrrrrrrrr")


def threads_table(results: JoinScaleResults) -> str:
    rows = []
    for harness in TORCH_KINDS:
        for m in sorted((m for m in results.measurements if m.harness == harness),
                        key=lambda m: m.n):
            calls = m.calls or CallCounts()
            native = results.seconds(NATIVE, m.n)
            rows.append([
                harness, f"{m.n:,}", "ranked" if m.ok else f"**stopped**: {m.failure}",
                f"{m.seconds:.2f}", "n/a" if m.median is None else f"{m.median:.2f}",
                f"{calls.calls / m.n:.1f}", f"{calls.conflicts:,}",
                "n/a" if m.join_writes is None else f"{m.join_writes:.2f}",
                f"{m.seconds / native.median:.0f}x" if m.ok and native is not None else "",
            ])
    return markdown_table(["handler", "N", "result", "slowest s", "median agent s",
                           "backend calls per agent", "CAS conflicts", "etcd writes per agent",
                           "/ native at this N"], rows, "lrlrrrrrr")


def stops(results: JoinScaleResults) -> str:
    lines = []
    for harness in TORCH_KINDS:
        largest, stopped = results.reached(harness)
        if largest is None and stopped is None:
            continue
        text = f"- {harness}: ranked up to N = {largest:,}" if largest is not None else \
            f"- {harness}: ranked at no N"
        if stopped is not None:
            text += f"; stopped at N = {stopped.n:,} ({stopped.failure})"
        else:
            text += " (every size tried)"
        lines.append(text)
    native = max((n for n in results.sizes if results.seconds(NATIVE, n) is not None),
                 default=None)
    if native is not None:
        lines.append(f"- native: ranked up to N = {native:,} (every size tried), "
                     f"{_cell(results.seconds(NATIVE, native))} s")
    return "\n".join(lines)


def fragments(results: JoinScaleResults) -> dict[str, str]:
    return {
        "settings": "\n".join([
            f"- native: N = {', '.join(f'{n:,}' for n in results.sizes)} agents over "
            f"{results.connections} connections, {results.trials} trial(s) per N (the "
            "native, the floor and the replay alternating, their order rotated); "
            f"keep_alive_interval {results.keep_alive_interval:g} s for every agent",
            f"- torch's handler as threads: N = "
            f"{', '.join(f'{n:,}' for n in results.thread_sizes)} in turn, until one does "
            f"not rank within the cap, {results.cap:g} s (its join_timeout); one trial each",
            f"- the whole topic took {results.elapsed_seconds:.0f} s"]),
        "time_table": time_table(results),
        "etcd_table": etcd_table(results),
        "threads_table": threads_table(results),
        "stops": stops(results),
    }


def _largest(results: JoinScaleResults) -> int | None:
    return max((n for n in results.sizes if results.seconds(NATIVE, n) is not None),
               default=None)


def verdicts(results: JoinScaleResults) -> list[Verdict]:
    out = []
    spread = results.seconds(NATIVE, TARGET_N)
    out.append(Verdict(
        "native 10k", f"{TARGET_N:,} native agents ranked in at most {TARGET_SECONDS:g} s "
        "(coroutines of one process)",
        "n/a" if spread is None else f"{spread.format()} s",
        None if spread is None else spread.median <= TARGET_SECONDS,
        "" if spread is None else
        f"{(spread.median / TARGET_SECONDS - 1) * 100:.0f}% over {TARGET_SECONDS:g} s"))
    ratio, floor = results.over_floor(TARGET_N), results.floor(TARGET_N)
    out.append(Verdict(
        "native floor", f"{TARGET_N:,} native agents within {FLOOR_MULTIPLE:g}x of etcd's floor "
        "(N lease grants + puts, a seal fanned out to N watchers), measured beside it",
        "n/a" if ratio is None or floor is None else
        f"{ratio.format()}x (floor {floor.format()} s)",
        None if ratio is None else ratio.median <= FLOOR_MULTIPLE,
        "" if ratio is None else
        f"{(ratio.median / FLOOR_MULTIPLE - 1) * 100:.0f}% over the {FLOOR_MULTIPLE:g}x ceiling"))
    natives = [m for m in results.measurements if m.harness == NATIVE and m.ok]
    if natives:
        worst = max(natives, key=lambda m: (m.round_writes or 0.0, m.seals))
        writes = worst.round_writes or 0.0
        joined, left = worst.join_writes or 0.0, writes - (worst.join_writes or 0.0)
        out.append(Verdict(
            "native writes", f"at most {WRITES_PER_NODE} etcd writes per node per round "
            "(join, leave) plus 1 seal",
            f"at most {joined:.2f} (join) + {left:.2f} (leave) per node at every N; "
            f"shared: {worst.seals} seal + {worst.shared_writes - worst.seals} other "
            "(the run lease's key, once per run)",
            writes <= WRITES_PER_NODE and worst.seals <= 1,
            f"{writes:.2f} per node" + (f", {worst.seals} seals" if worst.seals > 1 else "")))
    return out


def facts(results: JoinScaleResults) -> dict[str, str]:
    """The largest N's phases and costs, for the notes on a missed target."""
    n = _largest(results)
    if n is None:
        return {}
    native = results.typical(NATIVE, n)
    found = {"scale_n": f"{n:,}"}

    def seconds(harness: str) -> str:
        spread = results.seconds(harness, n)
        return "n/a" if spread is None else f"{spread.median:.2f} s"

    def cpu(harness: str) -> str:
        m = results.typical(harness, n)
        if m is None or m.etcd is None or m.etcd.cpu_seconds is None:
            return "n/a"
        return f"{m.etcd.cpu_seconds:.1f} s"

    found.update({
        "scale_native": seconds(NATIVE), "scale_floor_joins": seconds(FLOOR_JOINS),
        "scale_fanout": seconds(FLOOR_FANOUT), "scale_replay_joins": seconds(RAW_JOINS),
        "scale_replay_ranks": seconds(RAW_RANKS),
        "scale_etcd_cpu_native": cpu(NATIVE), "scale_etcd_cpu_floor": cpu(FLOOR_JOINS),
        "scale_etcd_cpu_replay_joins": cpu(RAW_JOINS),
        "scale_etcd_cpu_replay_ranks": cpu(RAW_RANKS),
    })
    if native is not None:
        found["scale_client_cpu"] = f"{native.client_cpu:.1f} s"
        if native.sealed is not None:
            found["scale_sealed"] = f"{native.sealed:.2f} s"
            found["scale_rank_phase"] = f"{native.seconds - native.sealed:.2f} s"
    floor_joins = results.typical(FLOOR_JOINS, n)
    if floor_joins is not None:
        found["scale_floor_client_cpu"] = f"{floor_joins.client_cpu:.1f} s"
    natives = [m for m in results.measurements if m.harness == NATIVE and m.ok]
    if natives:
        worst = max(natives, key=lambda m: m.round_writes or 0.0)
        revisions = worst.etcd.revisions if worst.etcd is not None else 0
        found["writes_worst"] = (f"N = {worst.n:,}, trial {worst.trial + 1}: {revisions:,} "
                                 f"revisions while joining, {worst.shared_writes} of them shared")
        found["writes_retries"] = ", ".join(
            f"{what} {count}" for what, count in worst.retries.most_common()) or "none"
    return found


def plot(results: JoinScaleResults, directory: Path) -> list[Path]:
    plt = _plots.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    lines = [(NATIVE, _plots.COLORS["native"], "o", "-"),
             ("floor", _plots.COLORS["raw"], "s", "--"),
             (RAW_JOINS, _plots.COLORS["native"], "^", ":"),
             (RAW_RANKS, _plots.COLORS["native"], "v", ":"),
             (TORCH_V3, _plots.COLORS["etcd-v3"], "o", "-"),
             (TORCH_C10D, _plots.COLORS["c10d"], "o", "-")]
    stop_markers = {TORCH_V3: "x", TORCH_C10D: "+"}
    ns = sorted({m.n for m in results.measurements})
    for label, color, marker, style in lines:
        xs, ys, lows, highs = [], [], [], []
        for n in ns:
            spread = results.floor(n) if label == "floor" else results.seconds(label, n)
            if spread is None:
                continue
            xs.append(n)
            ys.append(spread.median)
            lows.append(spread.median - spread.low)
            highs.append(spread.high - spread.median)
        name = "etcd's floor (grants + puts, then fan-out)" if label == "floor" else label
        if xs:
            left.errorbar(xs, ys, yerr=[lows, highs], marker=marker, linestyle=style,
                          color=color, capsize=3, label=name)
        if label in stop_markers:
            _largest_ok, stopped = results.reached(label)
            if stopped is not None:
                left.scatter([stopped.n], [results.cap], marker=stop_markers[label], s=120,
                             color=color, zorder=5,
                             label=f"{label}: stopped, not ranked within {results.cap:g} s")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("agents N (min = max = N), one process")
    left.set_ylabel("seconds until every agent holds its rank")
    left.set_title("Time", fontsize=10)
    for label, color in ((NATIVE, _plots.COLORS["native"]), (FLOOR_JOINS, _plots.COLORS["raw"]),
                         (TORCH_V3, _plots.COLORS["etcd-v3"])):
        for direction, style in (("bytes_in", "-"), ("bytes_out", ":")):
            xs, ys = [], []
            for n in ns:
                m = results.typical(label, n)
                if m is not None and m.ok and m.etcd is not None:
                    xs.append(n)
                    ys.append(m.etcd.count(direction) / n)
            if xs:
                right.plot(xs, ys, marker="o", linestyle=style, color=color,
                           label=f"{label}, {'to' if direction == 'bytes_in' else 'from'} etcd")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("agents N")
    right.set_ylabel("bytes per agent (etcd's gRPC counters)")
    right.set_title("Bytes to and from etcd per agent, to rank it", fontsize=10)
    for axes in (left, right):
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    figure.suptitle("N agents in one process: the native rendezvous, etcd's floor, "
                    "torch's handler as threads")
    return [_plots.save(figure, directory / "join_scale.png")]


TOPIC: Topic[Settings, JoinScaleResults] = Topic(
    "join-scale", __name__, Settings(), QUICK, collect, fragments, plot, verdicts, facts)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
