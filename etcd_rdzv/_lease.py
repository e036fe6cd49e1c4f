"""Leases for keys that must disappear some time after their last write."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._connection import EtcdClient
from .deadline import Deadline
from .errors import LeaseNotFoundError

T = TypeVar("T")

__all__ = ["AmortizedLease", "lease_window"]

_MAX_WINDOW = 60


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
