"""Steady state: what N nodes' heartbeats cost etcd while a job trains, per handler.

    python -m benchmarks.steady_state [--quick] [--nodes 1000] [--seconds 300]
                                      [--keep-alive-interval 5] [--writers 4]
                                      [--connections 8] [--sample-every 10]

Each handler gets a fresh etcd with etcd's defaults (no auto-compaction, the 2 GiB quota),
N nodes in one process over ``--connections`` connections, and ``--seconds`` of training
with no membership change; every ``--sample-every`` seconds etcd's revision, database size
and lease renewals are read from etcd itself (:mod:`._probe`).

* **native**: N :class:`~etcd_rdzv.AsyncNativeRendezvous` nodes rendezvous once (not
  measured), then train: each renews its lease every ``keep_alive_interval``, which is all a
  native node sends while nothing changes.
* **torch's handler**: what torch's ``DynamicRendezvousHandler`` writes for N nodes: each
  node, every ``keep_alive_interval``, writes the whole state (a pickled ``_RendezvousState``
  of N nodes, :func:`etcd_rdzv.testing.states.torch_state`) with its own heartbeat renewed,
  by compare-and-swap through :class:`~etcd_rdzv.AsyncEtcdRendezvousBackend` (what the
  etcd-v3 backend runs). The nodes are simulated: their heartbeats come at torch's rate (N /
  ``keep_alive_interval`` a second, node after node), written by ``--writers`` concurrent
  writers that retry a conflicted write, as torch's handler does; a write goes out with the
  newest token any writer saw (a node syncs before it writes). The node's new timestamp is
  written into the pickle in place, the bytes ``pickle.dumps`` would give (checked by
  unpickling at the end): pickling N nodes 200 times a second would take more CPU than the
  client has here. The rate achieved is reported beside the rate wanted.

Reads write nothing (torch's agent asks ``num_nodes_waiting()`` every few seconds: torch's
handler reads the state for it, the native one answers from its watch) and are left out.
"""

from __future__ import annotations

import asyncio
import datetime
import pickle
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    AsyncNativeRendezvous,
    EtcdClient,
    EtcdConfig,
    NativeSettings,
    RunKeys,
)
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing.states import torch_state

from . import _plots
from ._backends import BenchServers
from ._common import Loop, Topic, Verdict, markdown_table, option
from ._probe import EtcdProbe, EtcdSample
from .join_scale import check_ranks, node_id

__all__ = ["TOPIC", "Case", "Settings", "SteadyResults", "collect"]

KEY_PREFIX = "/etcd-rdzv-bench"
NATIVE = "native"
TORCH = "torch's handler"
QUOTA = 2 * 1024**3  # etcd's default --quota-backend-bytes


@dataclass(frozen=True)
class Settings:
    nodes: int = option(1000, "nodes heartbeating")
    seconds: float = option(300.0, "seconds of training per handler")
    keep_alive_interval: float = option(5.0, "keep_alive_interval, seconds (torch's default)",
                                        low=0.01)
    writers: int = option(4, "concurrent writers of torch's heartbeats")
    connections: int = option(8, "etcd connections the nodes share")
    sample_every: float = option(10.0, "seconds between samples of etcd", low=0.1)


QUICK = Settings(seconds=30.0, sample_every=5.0)


@dataclass(frozen=True)
class Point:
    """etcd at one instant of a case, relative to its start."""

    seconds: float
    revisions: int
    db_growth: int
    renewals: float


@dataclass
class Case:
    label: str
    nodes: int
    keep_alive_interval: float
    points: list[Point] = field(default_factory=list)
    heartbeats: int = 0
    """torch: heartbeat writes that succeeded."""
    conflicts: int = 0
    """torch: writes refused by the compare (retried)."""
    state_bytes: int = 0
    """torch: the pickled state's size."""

    @property
    def seconds(self) -> float:
        return self.points[-1].seconds if self.points else 0.0

    @property
    def revisions(self) -> int:
        return self.points[-1].revisions if self.points else 0

    @property
    def db_growth(self) -> int:
        return self.points[-1].db_growth if self.points else 0

    def per_minute(self, value: float) -> float:
        return value / self.seconds * 60 if self.seconds else 0.0

    @property
    def wanted_rate(self) -> float:
        """Heartbeats a second the nodes send."""
        return self.nodes / self.keep_alive_interval


@dataclass
class SteadyResults:
    cases: list[Case] = field(default_factory=list)
    seconds: float = 0.0
    writers: int = 0
    connections: int = 0

    def case(self, label: str) -> Case | None:
        return next((case for case in self.cases if case.label == label), None)


class _Sampler:
    """etcd sampled into ``case.points``, relative to the first sample."""

    def __init__(self, probe: EtcdProbe, case: Case, say: Callable[[str], None]) -> None:
        self._probe = probe
        self._case = case
        self._say = say
        self._first: EtcdSample | None = None
        self._started = 0.0

    async def sample(self) -> Point:
        sample = await asyncio.get_running_loop().run_in_executor(None, self._probe.sample)
        if self._first is None:
            self._first, self._started = sample, time.monotonic()
        delta = sample - self._first
        point = Point(time.monotonic() - self._started, delta.revisions, delta.db_growth,
                      delta.count("renewals"))
        self._case.points.append(point)
        return point

    async def every(self, every: float, seconds: float) -> None:
        """Sample (unless done already), then every ``every`` seconds for ``seconds``."""
        if self._first is None:
            await self.sample()
        next_minute = 60.0
        while (elapsed := time.monotonic() - self._started) < seconds:
            await asyncio.sleep(min(every, seconds - elapsed))
            point = await self.sample()
            if point.seconds >= next_minute or point.seconds >= seconds:
                next_minute += 60.0
                self._say(f"steady: {self._case.label}: {point.seconds:.0f} s, "
                          f"{point.revisions:,} revisions, db +{point.db_growth / 1e6:,.1f} MB, "
                          f"{point.renewals:,.0f} lease renewals")


def _clients(endpoint: str, settings: Settings) -> list[EtcdClient]:
    config = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=60)
    return [EtcdClient(config) for _ in range(settings.connections)]


async def native_case(endpoint: str, probe: EtcdProbe, settings: Settings,
                      say: Callable[[str], None]) -> Case:
    clients = _clients(endpoint, settings)
    keys = RunKeys(f"steady-{uuid.uuid4().hex[:12]}", KEY_PREFIX)
    native = NativeSettings(settings.nodes, settings.nodes,
                            keep_alive_interval=settings.keep_alive_interval)
    nodes = [AsyncNativeRendezvous(clients[index % len(clients)], keys, native, node_id(index))
             for index in range(settings.nodes)]
    case = Case(NATIVE, settings.nodes, settings.keep_alive_interval)
    try:
        admissions = await asyncio.gather(*(node.next_rendezvous() for node in nodes))
        check_ranks(NATIVE, settings.nodes, admissions)
        await _Sampler(probe, case, say).every(settings.sample_every, settings.seconds)
        await asyncio.gather(*(node.leave() for node in nodes))
    finally:
        for client in clients:
            await client.close()
    return case


def datetime_payload(stamp: datetime.datetime) -> bytes:
    """The 10 bytes a ``datetime`` pickles as (the first argument of its ``__reduce__``)."""
    payload = stamp.__reduce__()[1][0]
    assert isinstance(payload, bytes) and len(payload) == 10
    return payload


def heartbeat_offsets(state: bytes) -> list[int]:
    """Where each node's heartbeat timestamp lies in the pickled state, node by node.

    A ``datetime`` pickles as its 10-byte payload (``__reduce__``); each node's is unique in
    :func:`torch_state` (random microseconds), which is checked.
    """
    offsets = []
    for stamp in pickle.loads(state).last_heartbeats.values():
        payload = datetime_payload(stamp)
        offset = state.find(payload)
        if offset < 0 or state.find(payload, offset + 1) >= 0:
            raise ValueError("A heartbeat's bytes are not found once in the pickled state.")
        offsets.append(offset)
    return offsets


async def torch_case(endpoint: str, probe: EtcdProbe, settings: Settings,
                     say: Callable[[str], None]) -> Case:
    clients = _clients(endpoint, settings)
    run_id = f"steady-{uuid.uuid4().hex[:12]}"
    backends = [AsyncEtcdRendezvousBackend(client, run_id, key_prefix=KEY_PREFIX)
                for client in clients]
    state = bytearray(torch_state(settings.nodes))
    offsets = heartbeat_offsets(bytes(state))
    case = Case(TORCH, settings.nodes, settings.keep_alive_interval, state_bytes=len(state))
    written: dict[int, datetime.datetime] = {}
    try:
        created = await backends[0].set_state(bytes(state), None)
        assert created is not None and created[2]
        newest = created[1]
        sampler = _Sampler(probe, case, say)
        await sampler.sample()  # before the first heartbeat
        started = time.monotonic()
        due_next = 0
        stop_at = started + settings.seconds

        async def writer(index: int) -> None:
            nonlocal newest, due_next
            backend = backends[index % len(backends)]
            while True:
                beat, due_next = due_next, due_next + 1
                due = started + beat * settings.keep_alive_interval / settings.nodes
                if due >= stop_at:
                    return
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                node = beat % settings.nodes
                while True:
                    now = datetime.datetime.now(datetime.timezone.utc)
                    offset = offsets[node]
                    state[offset:offset + 10] = datetime_payload(now)
                    result = await backend.set_state(bytes(state), newest)
                    assert result is not None
                    newest = max(newest, result[1])
                    if result[2]:
                        written[node] = now
                        break
                    case.conflicts += 1
                case.heartbeats += 1

        writers = [asyncio.ensure_future(writer(index)) for index in range(settings.writers)]
        await sampler.every(settings.sample_every, settings.seconds)
        await asyncio.gather(*writers)
        await sampler.sample()  # the last writes in flight have landed
        _check_state(bytes(state), written)
    finally:
        for client in clients:
            await client.close()
    return case


def _check_state(state: bytes, written: dict[int, datetime.datetime]) -> None:
    """The state written in place unpickles, with every node's last heartbeat."""
    heartbeats = list(pickle.loads(state).last_heartbeats.values())
    if any(heartbeats[node] != stamp for node, stamp in written.items()):
        raise RuntimeError("The heartbeats written in place are not the state's.")


def collect(settings: Settings, say: Callable[[str], None]) -> SteadyResults:
    started = time.monotonic()
    results = SteadyResults(writers=settings.writers, connections=settings.connections)
    for label, case in ((NATIVE, native_case), (TORCH, torch_case)):
        with BenchServers(with_tcp_store=False) as servers:
            process = servers.etcd.member.process
            probe = EtcdProbe(servers.etcd_endpoint, None if process is None else process.pid)
            loop = Loop()
            try:
                results.cases.append(loop.run(case(servers.etcd_endpoint, probe, settings, say)))
            finally:
                loop.close()
        say(f"steady: {label} done")
    results.seconds = time.monotonic() - started
    return results


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:,.0f} min" if seconds >= 60 else f"{seconds:,.0f} s"


def steady_table(results: SteadyResults) -> str:
    rows = []
    for case in results.cases:
        growth = case.per_minute(case.db_growth)
        fill = "not growing" if growth <= 0 else _minutes(QUOTA / growth * 60)
        beats = "" if case.label == NATIVE else \
            f"{case.heartbeats / case.seconds:,.0f} ({case.wanted_rate:,.0f})"
        rows.append([case.label, f"{case.nodes:,}", _minutes(case.seconds),
                     f"{case.revisions:,}", f"{case.per_minute(case.revisions):,.0f}",
                     f"{case.per_minute(case.db_growth) / 1e6:,.1f} MB",
                     f"{case.points[-1].renewals / case.seconds:,.0f}" if case.points else "",
                     beats, f"{case.conflicts:,}" if case.label != NATIVE else "", fill])
    return markdown_table(["handler", "nodes", "measured", "etcd revisions",
                           "revisions per minute", "db growth per minute",
                           "lease renewals per s", "state writes per s (wanted)",
                           "CAS conflicts", "fills 2 GiB in"], rows, "lrrrrrrrrr")


def fragments(results: SteadyResults) -> dict[str, str]:
    native, torch = results.case(NATIVE), results.case(TORCH)
    first = native or torch
    lines = []
    if first is not None:
        lines.append(f"- {first.nodes:,} nodes, keep_alive_interval {first.keep_alive_interval:g} "
                     f"s, {_minutes(first.seconds)} per handler, a fresh etcd each; "
                     f"{results.connections} connections; torch's heartbeats written by "
                     f"{results.writers} writers")
    if torch is not None:
        lines.append(f"- torch's state for {torch.nodes:,} nodes: {torch.state_bytes:,} B "
                     "pickled")
    lines.append(f"- the whole topic took {results.seconds:.0f} s")
    return {"settings": "\n".join(lines), "steady_table": steady_table(results)}


def verdicts(results: SteadyResults) -> list[Verdict]:
    case = results.case(NATIVE)
    if case is None:
        return []
    return [Verdict(
        "steady", f"no etcd revision while {case.nodes:,} native nodes heartbeat (steady state)",
        f"{case.revisions:,} revisions and {case.db_growth:,} B of db growth in "
        f"{_minutes(case.seconds)}, {case.points[-1].renewals:,.0f} lease renewals",
        case.revisions == 0, f"{case.per_minute(case.revisions):,.0f} revisions per minute")]


def plot(results: SteadyResults, directory: Path) -> list[Path]:
    plt = _plots.pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {NATIVE: _plots.COLORS["native"], TORCH: _plots.COLORS["etcd-v3"]}
    for case in results.cases:
        xs = [point.seconds / 60 for point in case.points]
        left.plot(xs, [point.revisions for point in case.points], marker=".",
                  color=colors[case.label], label=case.label)
        right.plot(xs, [point.db_growth / 1e6 for point in case.points], marker=".",
                   color=colors[case.label], label=case.label)
    for axes in (left, right):
        axes.set_xlabel("minutes of training")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    left.set_ylabel("etcd revisions since the start")
    right.set_ylabel("etcd db growth, MB")
    nodes = results.cases[0].nodes if results.cases else 0
    figure.suptitle(f"Steady state: {nodes:,} nodes heartbeating, no membership change")
    return [_plots.save(figure, directory / "steady_state.png")]


TOPIC: Topic[Settings, SteadyResults] = Topic(
    "steady", __name__, Settings(), QUICK, collect, fragments, plot, verdicts)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
