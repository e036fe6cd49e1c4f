"""Leases for the run's keys: what a write attaches, and what happens when etcd lost it.

A :class:`LeaseHolder` runs a write with its lease and, when etcd no longer has that lease
(a write naming a missing lease is never applied), takes another and runs it again. Two
kinds exist: :class:`AmortizedLease` (``handler=torch``: keys live ``ttl`` after their last
write) and :class:`~etcd_rdzv.native.RunLease` (``handler=native``: keys live while any node
of the run renews the run lease, and ``ttl`` after the last one has gone).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from ._connection import EtcdClient
from .deadline import Deadline
from .errors import LeaseNotFoundError

T = TypeVar("T")

__all__ = ["AmortizedLease", "LeaseHolder", "lease_window"]

_MAX_WINDOW = 60


class LeaseHolder(Protocol):
    """Runs a write with a lease, replacing the lease when etcd has lost it."""

    async def write(self, call: Callable[[int], Awaitable[T]], deadline: Deadline) -> T:
        """``call(lease_id)``; again with a new lease if etcd no longer has that one."""
        ...


def lease_window(ttl: int) -> int:
    """How long one granted lease is reused for writes: ttl/10, between 1 s and 60 s."""
    return max(1, min(_MAX_WINDOW, ttl // 10))


class AmortizedLease:
    """Hands out a lease that keeps a key for ``ttl`` to ``ttl + window`` s after a write.

    A key put with a lease lives until that lease expires. Granting a lease per write would
    add a round trip to every write; instead a lease of ``ttl + window`` seconds is granted
    and reused for ``window`` seconds (:func:`lease_window`), so at most one grant happens
    per window for each backend (and the store created with it, which shares its lease).
    A key written at time ``t`` with a lease granted at ``g`` (``t - window < g <= t``)
    expires at ``g + ttl + window``: between ``t + ttl`` and ``t + ttl + window``. With the
    default ttl of 7200 s that is 7200 to 7260 s.
    """

    def __init__(self, client: EtcdClient, ttl: int) -> None:
        self._client = client
        self.ttl = ttl
        self.window = lease_window(ttl)
        self._lease_id = 0
        self._granted_at = -math.inf
        self._lock: asyncio.Lock | None = None

    async def lease_id(self, deadline: Deadline) -> int:
        """The lease to attach to a write now; granted when the current one is too old."""
        if time.monotonic() - self._granted_at < self.window:
            return self._lease_id
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._granted_at >= self.window:
                # Taken before the request: the server starts the lease later, never earlier.
                sent_at = time.monotonic()
                self._lease_id = await self._client.grant_lease(self.ttl + self.window, deadline)
                self._granted_at = sent_at
            return self._lease_id

    async def write(self, call: Callable[[int], Awaitable[T]], deadline: Deadline) -> T:
        """Run ``call(lease_id)``; if etcd no longer has that lease (a restore, a revoke),
        grant another and run it again: a write naming a missing lease is never applied."""
        while True:
            lease_id = await self.lease_id(deadline)
            try:
                return await call(lease_id)
            except LeaseNotFoundError:
                self.discard(lease_id)

    def discard(self, lease_id: int) -> None:
        """Stop using ``lease_id`` (etcd reported it gone, e.g. after a restore)."""
        if self._lease_id == lease_id:
            self._granted_at = -math.inf
