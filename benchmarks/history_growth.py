"""How fast torch's heartbeat rewrites grow etcd's database, with and without compaction.

    python -m benchmarks.history_growth [--quick] [--nodes 100 1000] [--writes 1000]

torch's handler rewrites the whole state every ``keep_alive_interval`` (5 s) for every
node: N nodes make N/5 full-state writes a second. etcd keeps every revision until it is
compacted, so the database grows by about one compressed state per write. Each case gets a
fresh etcd, so that no case reuses pages another one freed. Not part of ``make bench``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from etcd_rdzv import AsyncEtcdRendezvousBackend, Deadline, EtcdClient, EtcdConfig
from etcd_rdzv.codec import StateCodec
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.states import torch_state

from ._common import Topic, markdown_table, option

__all__ = ["TOPIC", "Growth", "Settings", "collect"]

QUOTA = 2 * 1024**3  # etcd's default --quota-backend-bytes
KEEP_ALIVE_INTERVAL = 5.0


@dataclass(frozen=True)
class Settings:
    nodes: tuple[int, ...] = option((100, 1000), "nodes in the state")
    writes: int = option(1000, "heartbeat writes per case", low=2)


QUICK = Settings(nodes=(100,), writes=200)


@dataclass(frozen=True)
class Growth:
    """One case: a state of ``nodes`` rewritten ``writes`` times."""

    nodes: int
    compact_interval: float
    raw: int
    stored: int
    writes: int
    growth: int
    """etcd's database size after the writes minus before, bytes."""
    late_growth: int
    """The same over the second half of the writes."""

    @property
    def late_per_write(self) -> float:
        return self.late_growth / (self.writes - self.writes // 2)

    @property
    def write_rate(self) -> float:
        """Full-state writes a second under torch's heartbeats."""
        return self.nodes / KEEP_ALIVE_INTERVAL


async def _db_size(client: EtcdClient) -> int:
    return (await client.status(Deadline.after(10))).db_size


async def grow(endpoint: str, nodes: int, writes: int, compact_interval: float) -> Growth:
    config = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=30)
    state = torch_state(nodes)
    async with EtcdClient(config) as client:
        backend = AsyncEtcdRendezvousBackend(client, f"growth-{nodes}-{compact_interval:g}",
                                             compact_interval=compact_interval)
        before = await _db_size(client)
        result = await backend.set_state(state)
        assert result is not None
        token = result[1]
        halfway = before
        for index in range(writes):
            if index == writes // 2:
                halfway = await _db_size(client)
            # Each heartbeat changes one timestamp; the pickle keeps its size.
            result = await backend.set_state(state[:-8] + index.to_bytes(8, "big"), token)
            assert result is not None and result[2]
            token = result[1]
        await asyncio.sleep(1.5)  # let a background compaction land
        after = await _db_size(client)
    return Growth(nodes, compact_interval, len(state), len(StateCodec().encode(state, key=b"k")),
                  writes, after - before, after - halfway)


def collect(settings: Settings, say: Callable[[str], None]) -> list[Growth]:
    cases = []
    for nodes in settings.nodes:
        for compact in (0.0, 1.0):
            started = time.monotonic()
            with EtcdServer() as server:
                cases.append(asyncio.run(grow(server.get_endpoint(), nodes, settings.writes,
                                              compact)))
            say(f"history growth: {nodes} nodes, compaction {compact:g}: "
                f"{time.monotonic() - started:.0f} s")
    return cases


def fragments(cases: list[Growth]) -> dict[str, str]:
    rows = []
    for case in cases:
        late = case.late_per_write
        fill = f"{QUOTA / (late * case.write_rate) / 60:,.0f} min" if late > 0 else \
            "not growing"
        rows.append([f"{case.nodes:,}", f"{case.raw:,} B", f"{case.stored:,} B",
                     "every 1 s" if case.compact_interval else "off", f"{case.writes:,}",
                     f"{case.growth / 1e6:,.1f} MB", f"{case.growth / case.writes / 1e3:,.1f} KB",
                     f"{late / 1e3:,.1f} KB", f"{case.write_rate:,.0f}", fill])
    return {"growth_table": markdown_table(
        ["nodes", "raw state", "stored", "compaction", "writes", "db growth", "per write",
         "second half, per write", "heartbeat writes/s", "fills 2 GiB in"], rows,
        "rrrlrrrrrr")}


TOPIC: Topic[Settings, list[Growth]] = Topic(
    "growth", __name__, Settings(), QUICK, collect, fragments)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
