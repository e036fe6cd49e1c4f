"""How fast torch's heartbeat rewrites grow etcd's database, with and without compaction.

torch's handler rewrites the whole state every ``keep_alive_interval`` (5 s) for every
node: N nodes make N/5 full-state writes a second. etcd keeps every revision until it is
compacted, so the database grows by about one compressed state per write.

    python -m benchmarks.history_growth [--nodes 100 1000] [--writes 1000] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from pathlib import Path

from etcd_rdzv import AsyncEtcdRendezvousBackend, Deadline, EtcdClient, EtcdConfig
from etcd_rdzv.codec import StateCodec
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.states import torch_state

QUOTA = 2 * 1024**3  # etcd's default --quota-backend-bytes
KEEP_ALIVE_INTERVAL = 5.0


async def grow(endpoint: str, nodes: int, writes: int, compact_interval: float) -> dict[str, float]:
    config = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=30)
    state = torch_state(nodes)
    stored = len(StateCodec().encode(state, key=b"k"))
    async with EtcdClient(config) as client:
        backend = AsyncEtcdRendezvousBackend(client, f"growth-{nodes}-{compact_interval:g}",
                                             compact_interval=compact_interval)
        before = (await client.status(Deadline.after(10))).db_size
        result = await backend.set_state(state)
        assert result is not None
        token = result[1]
        started = time.monotonic()
        halfway = before
        for index in range(writes):
            if index == writes // 2:
                halfway = (await client.status(Deadline.after(10))).db_size
            # Each heartbeat changes one timestamp; the pickle keeps its size.
            result = await backend.set_state(state[:-8] + index.to_bytes(8, "big"), token)
            assert result is not None and result[2]
            token = result[1]
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)  # let a background compaction land
        after = (await client.status(Deadline.after(10))).db_size
    growth = after - before
    late_growth = after - halfway
    rate = nodes / KEEP_ALIVE_INTERVAL  # full-state writes a second under torch's heartbeats
    per_write = growth / writes
    return {
        "nodes": nodes, "raw": len(state), "stored": stored, "writes": writes,
        "growth": growth, "per_write": per_write, "write_rate": rate,
        "late_per_write": late_growth / (writes - writes // 2),
        "writes_per_s": writes / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/history_growth.md"))
    args = parser.parse_args(argv)
    rows = []
    for nodes in args.nodes:
        for compact in (0.0, 1.0):
            # A fresh etcd per case, so that no case reuses pages another one freed.
            with EtcdServer() as server:
                rows.append((compact, asyncio.run(grow(server.get_endpoint(), nodes,
                                                       args.writes, compact))))
    lines = [
        "| nodes | raw state | stored | compaction | writes | db growth | per write | "
        "second half, per write | heartbeat writes/s | fills 2 GiB in |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for compact, row in rows:
        late = row["late_per_write"]
        fill = f"{QUOTA / (late * row['write_rate']) / 60:,.0f} min" if late > 0 else \
            "not growing"
        lines.append(
            f"| {row['nodes']:,.0f} | {row['raw']:,.0f} B | {row['stored']:,.0f} B | "
            f"{'every 1 s' if compact else 'off'} | {row['writes']:,.0f} | "
            f"{row['growth'] / 1e6:,.1f} MB | {row['per_write'] / 1e3:,.1f} KB | "
            f"{late / 1e3:,.1f} KB | {row['write_rate']:,.0f} | {fill} |"
        )
    report = "\n".join([
        f"Command: `python -m benchmarks.history_growth {' '.join(argv or sys.argv[1:])}`",
        f"Machine: {platform.machine()}, Python {platform.python_version()}",
        "",
        *lines,
        "",
        "db growth is etcd's dbSize after minus before; \"second half\" is the growth per write "
        "over the last half of the writes, which the time to fill etcd's default 2 GiB quota "
        "at torch's heartbeat rate (nodes / 5 s) is computed from. Pages freed by compaction "
        "are reused, not returned: defragment to shrink the file.",
    ])
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
