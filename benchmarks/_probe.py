"""What etcd itself did during a measurement: its revision, database size, counters and CPU.

:class:`EtcdProbe` reads them over etcd's HTTP endpoints on its client port (``/metrics``,
and ``/v3/maintenance/status`` through the gRPC gateway), synchronously and without gRPC, so
that a probe never shares a connection or an event loop with the clients it measures. Two
samples subtract into an :class:`EtcdDelta`. Take samples between phases, not during one: a
sample is two HTTP requests on the machine under test.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from dataclasses import dataclass

__all__ = ["EtcdDelta", "EtcdProbe", "EtcdSample"]

#: etcd's counters the benchmarks report, by the name used here.
COUNTERS = {
    "bytes_in": "etcd_network_client_grpc_received_bytes_total",
    "bytes_out": "etcd_network_client_grpc_sent_bytes_total",
    "events": "etcd_debugging_mvcc_events_total",
    "ranges": "etcd_mvcc_range_total",
    "txns": "etcd_mvcc_txn_total",
    "puts": "etcd_mvcc_put_total",
    "grants": "etcd_debugging_lease_granted_total",
    "renewals": "etcd_debugging_lease_renewed_total",
    "revokes": "etcd_debugging_lease_revoked_total",
}
_TIMEOUT = 30.0


@dataclass(frozen=True)
class EtcdSample:
    revision: int
    db_size: int
    counters: dict[str, float]
    cpu_seconds: float | None
    """etcd's user + system CPU time so far; None where /proc cannot tell."""

    def __sub__(self, before: EtcdSample) -> EtcdDelta:
        cpu = None if self.cpu_seconds is None or before.cpu_seconds is None \
            else self.cpu_seconds - before.cpu_seconds
        return EtcdDelta(self.revision - before.revision, self.db_size - before.db_size,
                         {name: value - before.counters.get(name, 0.0)
                          for name, value in self.counters.items()}, cpu)


@dataclass(frozen=True)
class EtcdDelta:
    """What etcd did between two samples."""

    revisions: int
    """Writes that changed the key-value store: each put, delete, Txn that wrote, lease
    revocation that deleted keys is one revision. Lease grants and renewals are none."""
    db_growth: int
    counters: dict[str, float]
    cpu_seconds: float | None

    def count(self, name: str) -> float:
        """One of :data:`COUNTERS`' names: gRPC bytes in and out, watch events sent, ..."""
        return self.counters.get(name, 0.0)


class EtcdProbe:
    """Samples one etcd member (plain HTTP on loopback, as the benchmarks start it).

    Args:
        endpoint: its client endpoint, ``host:port``.
        pid: its process id, for its CPU time (None: not measured).
    """

    def __init__(self, endpoint: str, pid: int | None = None) -> None:
        self._base = f"http://{endpoint}"
        self._pid = pid

    def sample(self) -> EtcdSample:
        request = urllib.request.Request(f"{self._base}/v3/maintenance/status", data=b"{}",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as answer:
            status = json.loads(answer.read())
        return EtcdSample(int(status["header"]["revision"]), int(status["dbSize"]),
                          self._counters(), self._cpu_seconds())

    def _counters(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self._base}/metrics", timeout=_TIMEOUT) as answer:
            text = answer.read().decode()
        wanted = {metric: name for name, metric in COUNTERS.items()}
        found: dict[str, float] = {}
        for line in text.splitlines():
            metric, _, value = line.partition(" ")
            if metric in wanted:
                found[wanted[metric]] = float(value)
        return found

    def _cpu_seconds(self) -> float | None:
        if self._pid is None:
            return None
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{self._pid}/stat", encoding="ascii") as file:
                # The fields after the command name, which is in brackets and may hold spaces.
                fields = file.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return None
