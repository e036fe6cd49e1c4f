"""Contention: N writers compare-and-swap one key; successful writes a second, attempts per write.

    python -m benchmarks.contention [--quick] [--tasks 8 32 128 256] [--processes 2 4 8]
                                    [--backoffs 0 0.02 0.05] [--seconds 2] [--rounds 2]

Each writer reads the state once, then loops: write the state with the counter it holds plus
one, using the token it holds; on a conflict, take the state and token the write returned and
try again (what torch's handler does). Two settings:

* asyncio tasks: N tasks on one event loop, one :class:`AsyncEtcdRendezvousBackend` each over
  one shared connection, at each ``conflict_backoff`` of ``--backoffs``;
* processes: N processes, one sync writer each through torch's interface: etcd-v3 (the
  shim, at each backoff), torch's etcd-v2 and torch's c10d.

At the end the counter must equal the number of successful writes (no update lost): checked.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_rdzv.testing.agents import AgentPool, worker_index

from . import _backends, _plots
from ._backends import C10D, ETCD_V2, ETCD_V3, BenchServers
from ._common import Spread, Topic, markdown_table, option

__all__ = ["TOPIC", "ContentionResults", "Settings", "collect"]


@dataclass(frozen=True)
class Settings:
    tasks: tuple[int, ...] = option((8, 32, 128, 256), "asyncio tasks writing (none: skip)")
    processes: tuple[int, ...] = option((2, 4, 8), "processes writing (none: skip)")
    backoffs: tuple[float, ...] = option((0.0, 0.02, 0.05), "conflict_backoff values, seconds",
                                         low=0)
    seconds: float = option(2.0, "seconds per case", low=0.01)
    rounds: int = option(2, "rounds, cases interleaved")


QUICK = Settings(tasks=(8, 32), processes=(2, 4), backoffs=(0.0, 0.05), seconds=1.0, rounds=1)
STATE_SIZE = 300
PRELOAD = (
    "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
    "torch.distributed.elastic.rendezvous.etcd_rendezvous_backend",
    "etcd_rdzv.elastic.backend",
    "etcd_rdzv.elastic.store",
    __name__,
)


class LostUpdateError(RuntimeError):
    """The counter does not equal the number of successful writes."""


def encode(counter: int, writer: int) -> bytes:
    """A state of :data:`STATE_SIZE` bytes holding the counter (and who wrote it)."""
    head = f"{counter}:{writer}:".encode()
    return head + b"." * (STATE_SIZE - len(head))


def decode(state: bytes) -> int:
    return int(state.split(b":", 1)[0])


@dataclass(frozen=True)
class WriterCount:
    successes: int
    attempts: int


# --- writers ------------------------------------------------------------------------------


async def _async_writer(backend: Any, writer: int, stop_at: float) -> WriterCount:
    current = await backend.get_state()
    assert current is not None
    state, token = current
    successes = attempts = 0
    while time.monotonic() < stop_at:
        result = await backend.set_state(encode(decode(state) + 1, writer), token)
        assert result is not None
        attempts += 1
        successes += bool(result[2])
        state, token = result[0], result[1]
    return WriterCount(successes, attempts)


async def _async_case(endpoint: str, tasks: int, backoff: float, seconds: float,
                      ) -> tuple[list[WriterCount], int]:
    from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, EtcdConfig
    from etcd_rdzv.config import parse_endpoints

    run_id = f"contention-{uuid.uuid4().hex[:8]}"
    config = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=60)
    async with EtcdClient(config) as client:
        backends = [AsyncEtcdRendezvousBackend(client, run_id, conflict_backoff=backoff)
                    for _ in range(tasks)]
        created = await backends[0].set_state(encode(0, -1), None)
        assert created is not None and created[2]
        stop_at = time.monotonic() + 0.05 + seconds
        counts = await asyncio.gather(*(_async_writer(b, i, stop_at)
                                        for i, b in enumerate(backends)))
        final = await backends[0].get_state()
    assert final is not None
    return list(counts), decode(final[0])


def process_writer(kind: str, endpoint: str, run_id: str, backoff: float, start_at: float,
                   seconds: float) -> WriterCount:
    """One process's writer through torch's interface (run by the agent pool)."""
    writer = worker_index()
    config: dict[str, object] = {"read_timeout": 60}
    if kind == ETCD_V3 and backoff:
        config["conflict_backoff"] = backoff
    with _backends.backend_for(kind, endpoint, run_id, config) as backend:
        current = backend.get_state()
        assert current is not None
        state, token = current
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        stop_at = start_at + seconds
        successes = attempts = 0
        while time.monotonic() < stop_at:
            result = backend.set_state(encode(decode(state) + 1, writer), token)
            assert result is not None
            attempts += 1
            successes += bool(result[2])
            state, token = result[0], result[1]
    return WriterCount(successes, attempts)


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    setting: str  # "tasks" or "processes"
    label: str  # "etcd-v3", "etcd-v3 shim", "etcd-v2", "c10d"
    writers: int
    backoff: float
    seconds: float
    counts: list[WriterCount]
    final: int

    @property
    def successes(self) -> int:
        return sum(c.successes for c in self.counts)

    @property
    def attempts(self) -> int:
        return sum(c.attempts for c in self.counts)

    @property
    def rate(self) -> float:
        return self.successes / self.seconds

    @property
    def attempts_per_success(self) -> float:
        return self.attempts / max(1, self.successes)

    @property
    def starved(self) -> int:
        """Writers that never succeeded."""
        return sum(1 for c in self.counts if c.successes == 0)


@dataclass
class ContentionResults:
    cases: list[Case] = field(default_factory=list)
    seconds: float = 0.0
    rounds: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def of(self, setting: str, label: str, writers: int, backoff: float) -> list[Case]:
        return [c for c in self.cases if (c.setting, c.label, c.writers, c.backoff)
                == (setting, label, writers, backoff)]

    def keys(self, setting: str) -> list[tuple[str, float]]:
        seen: dict[tuple[str, float], None] = {}
        for case in self.cases:
            if case.setting == setting:
                seen.setdefault((case.label, case.backoff), None)
        return list(seen)

    def writers(self, setting: str) -> list[int]:
        return sorted({c.writers for c in self.cases if c.setting == setting})


def _check(case: Case) -> None:
    if case.final != case.successes:
        raise LostUpdateError(f"{case.setting} {case.label} x{case.writers}: the counter is "
                              f"{case.final} after {case.successes} successful writes")


def collect(settings: Settings, say: Callable[[str], None]) -> ContentionResults:
    tasks, processes, backoffs, seconds, rounds = (
        settings.tasks, settings.processes, settings.backoffs, settings.seconds, settings.rounds)
    results = ContentionResults(seconds=seconds, rounds=rounds)
    v2 = _backends.v2_unavailable()
    if v2 is not None:
        results.skipped[ETCD_V2] = v2
    backoffs = tuple(backoffs)
    with BenchServers() as servers:
        endpoint = servers.etcd_endpoint
        for index in range(rounds):
            shift = index % len(backoffs)
            for n in tasks:
                for backoff in backoffs[shift:] + backoffs[:shift]:
                    counts, final = asyncio.run(_async_case(endpoint, n, backoff, seconds))
                    case = Case("tasks", ETCD_V3, n, backoff, seconds, counts, final)
                    _check(case)
                    results.cases.append(case)
                    say(f"contention: {n:>3} tasks, backoff {backoff:<4g}: "
                        f"{case.rate:7.0f} writes/s, {case.attempts_per_success:5.2f} attempts"
                        " per write")
        if not processes:
            return results
        kinds: list[tuple[str, str, float]] = [
            ("etcd-v3 shim", ETCD_V3, backoff) for backoff in backoffs]
        if v2 is None:
            kinds.append((ETCD_V2, ETCD_V2, 0.0))
        kinds.append((C10D, C10D, 0.0))
        with AgentPool(max(processes), PRELOAD) as pool:
            for index in range(rounds):
                shift = index % len(kinds)
                for n in processes:
                    for label, kind, backoff in kinds[shift:] + kinds[:shift]:
                        run_id = f"contention-{uuid.uuid4().hex[:8]}"
                        where = servers.endpoint(kind)
                        with _backends.backend_for(kind, where, run_id) as backend:
                            created = backend.set_state(encode(0, -1), None)
                            assert created is not None and created[2]
                            start_at = time.monotonic() + 0.5
                            counts = pool.call(process_writer, kind, where, run_id, backoff,
                                               start_at, seconds, workers=range(n),
                                               timeout=seconds + 120.0)
                            last = backend.get_state()
                        assert last is not None
                        case = Case("processes", label, n, backoff, seconds, counts,
                                    decode(last[0]))
                        _check(case)
                        results.cases.append(case)
                        say(f"contention: {n:>3} processes, {label:<13} backoff {backoff:<4g}: "
                            f"{case.rate:7.0f} writes/s, {case.attempts_per_success:5.2f} "
                            "attempts per write")
    return results


def _label(label: str, backoff: float) -> str:
    return f"{label}, backoff {backoff:g}" if backoff else label


def table(results: ContentionResults, setting: str) -> str:
    rows = []
    for label, backoff in results.keys(setting):
        for n in results.writers(setting):
            cases = results.of(setting, label, n, backoff)
            if not cases:
                continue
            rows.append([
                _label(label, backoff), n,
                Spread.of(c.rate for c in cases).format(digits=0),
                Spread.of(c.attempts_per_success for c in cases).format(digits=2),
                f"{statistics.median(c.starved for c in cases):.0f}",
                f"{sum(c.successes for c in cases):,}",
            ])
    noun = "tasks" if setting == "tasks" else "processes"
    return markdown_table(["writer", noun, "successful CAS/s", "attempts per success",
                           "writers with no success", "writes checked"], rows, "lrrrrr")


def fragments(results: ContentionResults) -> dict[str, str]:
    return {
        "settings": "\n".join([
            f"- {results.seconds:g} s per case, {results.rounds} round(s), cases interleaved",
            *(f"- skipped: {k}: {why}" for k, why in results.skipped.items())]),
        "tasks_table": table(results, "tasks"),
        "processes_table": "Processes (one sync writer each, torch's interface):\n\n"
        + table(results, "processes") if results.writers("processes") else "",
    }


def plot(results: ContentionResults, directory: Path) -> list[Path]:
    plt = _plots.pyplot()
    settings = [s for s in ("tasks", "processes") if results.writers(s)]
    figure, axes_list = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4),
                                     squeeze=False)
    for axes, setting in zip(axes_list[0], settings, strict=True):
        for label, backoff in results.keys(setting):
            xs, ys, lows, highs = [], [], [], []
            for n in results.writers(setting):
                cases = results.of(setting, label, n, backoff)
                if not cases:
                    continue
                spread = Spread.of(c.rate for c in cases)
                xs.append(n)
                ys.append(spread.median)
                lows.append(spread.median - spread.low)
                highs.append(spread.high - spread.median)
            color = _plots.COLORS.get(label if label != ETCD_V3 else "etcd-v3 async", "#333")
            axes.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, color=color,
                          linestyle={0.0: "-", 0.02: "--", 0.05: ":"}.get(backoff, "-."),
                          label=_label(label, backoff))
        axes.set_xscale("log", base=2)
        ticks = results.writers(setting)
        axes.set_xticks(ticks, [str(t) for t in ticks])
        axes.set_xlabel("asyncio tasks" if setting == "tasks" else "processes")
        axes.set_ylabel("successful CAS per second")
        axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle("N writers on one key")
    return [_plots.save(figure, directory / "contention.png")]


TOPIC: Topic[Settings, ContentionResults] = Topic(
    "contention", __name__, Settings(), QUICK, collect, fragments, plot)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
