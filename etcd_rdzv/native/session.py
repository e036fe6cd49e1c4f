"""Leases of the native rendezvous: the one home of their policy.

* **A node's lease** (:class:`NodeSession`, as etcd's ``concurrency.Session``: a lease and
  its keep-alive are one object). TTL ``keep_alive_interval * keep_alive_max_attempt``
  (torch's heartbeat timeout, :attr:`~.model.NativeSettings.node_ttl`), renewed at least
  three times per TTL so that one late renewal never lets it lapse. A renewal writes no
  revision. When etcd says the lease is gone (the node missed its renewals, or etcd lost
  it), :attr:`NodeSession.lease` turns 0 and the session wakes its node, which joins again
  with a new one. While etcd is away the renewals are retried every interval; etcd extends
  every lease by its TTL when a leader is elected, so a lease survives an outage.
* **The run lease** (:class:`RunLease`): the run's shared keys (seals, ``closed``, the
  run's store) live on it. Every node renews it :data:`RUN_LEASE_RENEWALS_PER_TTL` times
  per ``ttl`` (no more often than its own keep-alives), so it lives while any node does and
  expires ``ttl`` after the last one; N nodes do not renew one lease N times an interval.
  :func:`run_lease_idle_seconds` is what an operator is told of a run nobody renews.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .._connection import EtcdClient
from ..cas import Expect, compare_and_swap
from ..deadline import Deadline
from ..errors import EtcdRendezvousError, EtcdStateError, LeaseNotFoundError, TransientError
from ..keys import RunKeys
from .model import NativeSettings, NodeId

__all__ = [
    "RUN_LEASE_RENEWALS_PER_TTL",
    "NodeSession",
    "RunLease",
    "run_lease",
    "run_lease_idle_seconds",
    "run_lease_renewal_period",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The run lease lasts ``ttl``: each node renews it this many times per ``ttl`` (but no more
#: often than its own keep-alives), plenty to keep it, and N nodes do not renew one lease N
#: times per interval.
RUN_LEASE_RENEWALS_PER_TTL = 10
#: Renewals of a node's lease per TTL, at least: one late renewal never lets it lapse.
_NODE_RENEWALS_PER_TTL = 3


def run_lease_renewal_period(settings: NativeSettings) -> float:
    """How often each node renews the run lease, seconds."""
    return max(settings.keep_alive_interval, settings.ttl / RUN_LEASE_RENEWALS_PER_TTL)


def run_lease_idle_seconds(granted_ttl: int, ttl_left: int, seconds_since_read: float) -> float:
    """How long, at least, since the last node of a run renewed its run lease: its age
    since the last renewal, less the renewal period (the last node may have left up to one
    period after it renewed), less a second for etcd's whole-second TTLs. Nodes whose
    ``keep_alive_interval`` is longer than ``ttl/10`` renew it that often, and the figure
    may then overstate by the difference."""
    age = granted_ttl - ttl_left + seconds_since_read
    return max(0.0, age - granted_ttl / RUN_LEASE_RENEWALS_PER_TTL - 1)


async def run_lease(client: EtcdClient, keys: RunKeys, ttl: int, deadline: Deadline) -> int:
    """The run lease of a native run: the one ``ctl/lease`` names, else a new lease of
    ``ttl`` seconds that this call names there (exactly one of concurrent callers wins)."""
    current = (await client.get(keys.run_lease, deadline)).kvs
    if current:
        try:
            return int(current[0].value, 16)
        except ValueError:
            raise EtcdStateError(
                f"{keys.run_lease.decode()!r} holds {bytes(current[0].value)[:80]!r}, not a "
                f"lease id: another program wrote it. Delete the key (etcd-rdzv cleanup, or "
                f"etcdctl del) or use another --rdzv-id.") from None
    lease = await client.grant_lease(ttl, deadline)
    # The value names this lease, so it is unique to this write (tagged): a write whose
    # answer was lost is known to have landed when the key holds it.
    result = await compare_and_swap(
        client, keys.run_lease, Expect.absent(), b"%x" % lease, deadline,
        f"Creating the run lease of {keys.run_id!r}", lease=lease, tagged=True,
    )
    if not result.applied and result.value is not None:
        await client.revoke_lease(lease, deadline)
        lease = int(result.value, 16)
    return lease


class RunLease:
    """The run lease as a :class:`~etcd_rdzv._lease.LeaseHolder`, for the run's shared keys:
    the seals, ``closed``, and the run's store (``MASTER_ADDR``, the agents' barriers), which
    so live while any node of the run lives, and ``ttl`` after the last one has gone."""

    def __init__(self, client: EtcdClient, keys: RunKeys, ttl: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl
        self.lease_id = 0
        """The lease last used (0: none yet); a node may set the one its control view saw."""

    async def write(self, call: Callable[[int], Awaitable[T]], deadline: Deadline) -> T:
        """``call(run_lease)``; once more with a new run lease if etcd no longer had it."""
        for attempt in range(2):
            if not self.lease_id:
                self.lease_id = await run_lease(self._client, self._keys, self._ttl, deadline)
            try:
                return await call(self.lease_id)
            except LeaseNotFoundError:
                self.lease_id = 0
                if attempt:  # the run lease expired between the read and the write, twice
                    raise
        raise AssertionError("unreachable")


class NodeSession:
    """A node's lease and the loop that keeps it (and the run lease) alive.

    Args:
        client: the connection to etcd.
        settings: the node's settings (TTLs and intervals).
        node: the node, for the logs.
        run_id: the run, for the logs.
        run_lease: the run lease to renew now (0: none yet); read at every renewal.
        wake: called when the lease was lost or a renewal failed for good, so that a
            waiting node looks again at once.
    """

    def __init__(self, client: EtcdClient, settings: NativeSettings, node: NodeId, run_id: str,
                 run_lease: Callable[[], int], wake: Callable[[], None]) -> None:
        self._client = client
        self._settings = settings
        self._node = node
        self._run_id = run_id
        self._run_lease = run_lease
        self._wake = wake
        self._task: asyncio.Task[None] | None = None
        self.lease = 0
        """The node's lease; 0 when it has none (not granted yet, or lost)."""
        self.failure: EtcdRendezvousError | None = None
        """The last renewal's failure that waiting cannot heal (permissions, TLS), if any."""

    @property
    def renew_every(self) -> float:
        """Seconds between renewals."""
        settings = self._settings
        return min(settings.keep_alive_interval, settings.node_ttl / _NODE_RENEWALS_PER_TTL)

    async def open(self, deadline: Deadline) -> None:
        """Take a lease and start renewing it."""
        await self.new_lease(deadline)
        self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def new_lease(self, deadline: Deadline) -> int:
        """A new lease for the node (after :meth:`lost`, or the first one)."""
        self.lease = await self._client.grant_lease(self._settings.node_ttl, deadline)
        return self.lease

    def lost(self, lease: int) -> None:
        """etcd no longer has ``lease`` (a write named it, or a renewal found it gone)."""
        if lease and self.lease == lease:
            log.warning("The lease of node %s in run %r expired (etcd lost it, or the node "
                        "missed %d keep-alives); it joins again with a new one.", self._node,
                        self._run_id, self._settings.keep_alive_max_attempt)
            self.lease = 0
            self._wake()

    async def close(self, deadline: Deadline) -> None:
        """Stop renewing and revoke the lease: the node's keys go at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lease, self.lease = self.lease, 0
        if lease:
            await self._client.revoke_lease(lease, deadline)

    async def _keep_alive(self) -> None:
        settings = self._settings
        every = self.renew_every
        run_lease_every = run_lease_renewal_period(settings)
        run_lease_renewed = -math.inf
        unreachable_since: float | None = None
        while True:
            await asyncio.sleep(every)
            deadline = Deadline.after(settings.heartbeat_timeout)
            try:
                lease = self.lease
                if lease and await self._client.keep_alive(lease, deadline) <= 0:
                    self.lost(lease)
                run_lease = self._run_lease()
                if run_lease and time.monotonic() - run_lease_renewed >= run_lease_every:
                    await self._client.keep_alive(run_lease, deadline)
                    run_lease_renewed = time.monotonic()
            except TransientError as exc:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning("etcd is unreachable; node %s keeps training and retries its "
                                "keep-alive every %g s (%s)", self._node, every, exc)
                continue
            except EtcdRendezvousError as exc:  # waiting will not heal it: say so, loudly
                if self.failure is None:
                    log.error("node %s cannot renew its lease in run %r: %s", self._node,
                              self._run_id, exc)
                    self.failure = exc
                    self._wake()
                continue
            except Exception as exc:
                log.warning("node %s: a keep-alive failed (%r); retrying in %g s", self._node,
                            exc, every)
                continue
            self.failure = None
            if unreachable_since is not None:
                log.warning("etcd is reachable again after %.0f s; node %s kept its lease",
                            time.monotonic() - unreachable_since, self._node)
                unreachable_since = None
