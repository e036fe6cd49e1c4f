"""The native rendezvous (``handler=native``): etcd's own primitives, not torch's one blob.

torch's ``DynamicRendezvousHandler`` keeps a whole rendezvous in one pickled value that every
node rewrites by compare-and-swap on every join and every heartbeat. Here each concept has
the etcd primitive made for it (keys in :class:`~etcd_rdzv.keys.RunKeys`):

* **A node is a lease.** Each node holds one lease for its life in the run, with a TTL of
  ``keep_alive_interval * keep_alive_max_attempt``, renewed every ``keep_alive_interval``.
  A renewal is a heartbeat that writes no revision, so a training job writes nothing to etcd
  between membership changes. A node that dies loses its keys when its lease expires; one
  that shuts down revokes it, and its keys go at once.
* **Joining is one Put** of the node's own key ``round/<r>/<node>`` under its lease (with
  the delete of its key in the previous round, in the same Txn): no compare, no conflict.
* **One Txn seals a round**: a create-only write of ``ctl/seal/<r>`` holding the *cutoff*
  revision and the size. The roster is every join key of round ``r`` that existed at the
  cutoff; a node's rank is the number of roster keys that sort before its own (one
  ``count_only`` Range at the cutoff revision), which is the rank torch gives it, since
  keys sort as torch sorts node descriptors. Any node may seal: the one whose join made
  ``max_nodes``, or, once ``min_nodes`` have joined and the previous round is empty, the
  first whose ``last_call_timeout`` runs out. Exactly one create succeeds.
* **One watch per node**, on the few ``ctl/`` keys (seals, ``closed``, waiting markers,
  the run lease): a node learns that its round is sealed from the event, never by polling.
* **Waiting and standing by.** A node that finds the open round sealed without it joins the
  next one. If the sealed round has room (fewer than ``max_nodes``, or a member gone), it
  also puts ``ctl/wait/<r+1>`` under its lease: the members' :meth:`num_nodes_waiting` turns
  positive, their agents restart them, and they all join round ``r + 1``. Otherwise it
  stands by (torch's redundancy list) until a member leaves or the run closes.
* **The run's shared keys** (seals, ``closed``) are put under a run lease that every node's
  keep-alive loop renews too, free of revisions: they live while any node lives and expire
  ``ttl`` seconds after the last one left. A seal removes the keys of the round before last.

**What one node costs per round**, whatever the number of nodes N: writes: one join Txn (it
also leaves the previous round), at most one seal attempt, a waiting marker if it waits;
reads: a count after joining and one per wake-up (a ``ctl/`` event, or a tick of
``keep_alive_interval`` while it waits for a round to fill), one rank count; events: the
seal of its round and a few ``ctl/`` changes. The one exception is the sealer of a round
more than ``max_nodes`` joined: it reads the first ``max_nodes`` keys to find the cutoff.

**etcd outages.** Keep-alives are retried every interval while etcd is away; etcd extends
every lease by its TTL when a leader is elected, so a node's lease survives the outage.
:meth:`num_nodes_waiting` answers from the watched ``ctl/`` keys, so it needs etcd only
while somebody waits, and answers its last value (with a warning) when etcd is away. Nothing
is purged when etcd comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

from aetcd import rpc, utils

from ._connection import EtcdClient
from .cas import Expect, compare_and_swap
from .config import DEFAULT_TTL, integer_at_least, seconds_between
from .deadline import Deadline
from .errors import (
    CompactedError,
    EtcdConnectionError,
    HandlerMismatchError,
    JoinTimeoutError,
    LeaseNotFoundError,
    RunClosedError,
    StandbyExitError,
)
from .keys import RunKeys

__all__ = [
    "RUN_LEASE_RENEWALS_PER_TTL",
    "Admission",
    "AsyncNativeRendezvous",
    "NativeSettings",
    "NodeId",
    "RunLease",
    "Seal",
    "close_native_run",
    "refuse_native_run",
    "run_lease",
    "run_lease_renewal_period",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Between a node descriptor's parts in its key. It sorts below every character an address
#: may hold, so ``"a" < "a-b"`` holds for the keys as for torch's tuples.
_SEPARATOR = " "
#: The control watch's reconnect pauses while etcd is away, seconds.
_WATCH_BACKOFF_INITIAL = 0.1
_WATCH_BACKOFF_MAX = 2.0

_local_ids = itertools.count()
_local_ids_lock = threading.Lock()


@dataclass(frozen=True, order=True)
class NodeId:
    """A node of the rendezvous, as torch describes one (``_NodeDesc``): ordered as torch
    orders them, by address, then process id, then the process-local id."""

    addr: str
    """The node's address: ``local_addr`` or the host's FQDN."""
    pid: int
    """The process id of the handler."""
    local_id: int
    """Unique within the process (a process may run several handlers)."""

    def __post_init__(self) -> None:
        if not self.addr or any(char <= _SEPARATOR for char in self.addr):
            raise ValueError(f"The option local_addr must be an address without spaces or "
                             f"control characters, got local_addr={self.addr!r}.")

    @classmethod
    def generate(cls, local_addr: str | None = None) -> NodeId:
        """A new node of this process, as torch's ``_NodeDescGenerator`` makes them."""
        with _local_ids_lock:
            local_id = next(_local_ids)
        return cls(local_addr or socket.getfqdn(), os.getpid(), local_id)

    @property
    def name(self) -> bytes:
        """The node in keys: fixed-width numbers, so byte order is torch's order."""
        return f"{self.addr}{_SEPARATOR}{self.pid:010d}{_SEPARATOR}{self.local_id:010d}" \
            .encode()

    @classmethod
    def from_name(cls, name: bytes) -> NodeId:
        addr, pid, local_id = name.decode().rsplit(_SEPARATOR, 2)
        return cls(addr, int(pid), int(local_id))

    def __str__(self) -> str:
        return f"{self.addr}_{self.pid}_{self.local_id}"  # torch's repr of _NodeDesc


@dataclass(frozen=True)
class NativeSettings:
    """torch's rendezvous settings, checked once. Seconds may be fractional."""

    min_nodes: int
    max_nodes: int
    join_timeout: float = 600.0
    """How long :meth:`AsyncNativeRendezvous.next_rendezvous` may take."""
    last_call_timeout: float = 30.0
    """How long a round waits for more nodes once ``min_nodes`` have joined."""
    close_timeout: float = 30.0
    """How long closing the run may take."""
    heartbeat_timeout: float = 5.0
    """How long one keep-alive may take."""
    keep_alive_interval: float = 5.0
    """Seconds between keep-alives."""
    keep_alive_max_attempt: int = 3
    """Keep-alives a node may miss before it counts as gone (its lease expires)."""
    ttl: int = DEFAULT_TTL
    """Seconds the run's shared keys outlive its last node."""

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalized once, here
        set_field(self, "min_nodes", integer_at_least("min_nodes", self.min_nodes, 1))
        set_field(self, "max_nodes", integer_at_least("max_nodes", self.max_nodes, 1))
        if self.max_nodes < self.min_nodes:
            raise ValueError(f"The maximum number of nodes ({self.max_nodes}) must be greater "
                             f"than or equal to the minimum number of nodes ({self.min_nodes}).")
        for name in ("join_timeout", "last_call_timeout", "close_timeout",
                     "heartbeat_timeout", "keep_alive_interval"):
            set_field(self, name, seconds_between(name, getattr(self, name), 0, low_open=True))
        set_field(self, "keep_alive_max_attempt",
                  integer_at_least("keep_alive_max_attempt", self.keep_alive_max_attempt, 1))
        set_field(self, "ttl", integer_at_least("ttl", self.ttl, 1))

    @property
    def node_ttl(self) -> int:
        """The TTL of a node's lease: torch's heartbeat timeout, in whole seconds."""
        return max(1, math.ceil(self.keep_alive_interval * self.keep_alive_max_attempt))


#: The run lease lasts ``ttl``: each node renews it this many times per ``ttl`` (but no more
#: often than its own keep-alives), plenty to keep it, and N nodes do not renew one lease N
#: times per interval.
RUN_LEASE_RENEWALS_PER_TTL = 10


def run_lease_renewal_period(settings: NativeSettings) -> float:
    """How often each node renews the run lease, seconds."""
    return max(settings.keep_alive_interval, settings.ttl / RUN_LEASE_RENEWALS_PER_TTL)


@dataclass(frozen=True)
class Seal:
    """A sealed round, as ``ctl/seal/<round>`` holds it."""

    round: int
    cutoff: int
    """The roster is every join key of the round that existed at this revision."""
    size: int
    """The number of nodes in the roster: the world size."""
    sealed_at: float
    """When it was sealed (the sealer's ``time.time()``)."""
    sealer: str
    """The node that sealed it."""

    def encode(self) -> bytes:
        return json.dumps({"round": self.round, "cutoff": self.cutoff, "size": self.size,
                           "sealed_at": self.sealed_at, "sealer": self.sealer}).encode()

    @classmethod
    def decode(cls, value: bytes) -> Seal:
        data = json.loads(value)
        return cls(int(data["round"]), int(data["cutoff"]), int(data["size"]),
                   float(data["sealed_at"]), str(data["sealer"]))


@dataclass(frozen=True)
class Admission:
    """A node's place in a sealed round: what :meth:`AsyncNativeRendezvous.next_rendezvous`
    returns."""

    round: int
    rank: int
    world_size: int


@dataclass
class _Control:
    """The ``ctl/`` keys as this node's watch last saw them."""

    seals: dict[int, Seal] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)
    closed: bool = False
    run_lease: int = 0
    revision: int = 0
    """The revision the mirror is current as of."""


class _ControlFeed:
    """The ``ctl/`` keys of one run, mirrored by one watch, for every node of the run that
    shares a client (in production one node per process; a harness runs thousands).

    Nodes wait on :attr:`changed`, which is set (and replaced) on every change a waiting
    node acts on: a seal, a waiting marker, the close.
    """

    _feeds: ClassVar[weakref.WeakKeyDictionary[EtcdClient, dict[bytes, _ControlFeed]]] = \
        weakref.WeakKeyDictionary()

    def __init__(self, client: EtcdClient | None, keys: RunKeys) -> None:
        self._client = client
        self._keys = keys
        self.control = _Control()
        self.changed = asyncio.Event()
        self._users = 0
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None

    @classmethod
    def detached(cls, keys: RunKeys) -> _ControlFeed:
        """An empty mirror, until a node starts."""
        return cls(None, keys)

    @classmethod
    async def attach(cls, client: EtcdClient, keys: RunKeys, deadline: Deadline) -> _ControlFeed:
        """The feed of ``keys``'s run on ``client``: loaded and watched by its first user.

        Raises:
            HandlerMismatchError: torch's handler drives this run.
        """
        feeds = cls._feeds.setdefault(client, {})
        feed = feeds.get(keys.control_prefix)
        if feed is None:
            feed = feeds[keys.control_prefix] = cls(client, keys)
        feed._users += 1
        try:
            if feed._ready is None:
                feed._ready = asyncio.get_running_loop().create_future()
                try:
                    if await feed._load(deadline):
                        raise _torch_run(keys)
                except BaseException as exc:
                    feed._ready.set_exception(exc)
                    feed._ready.exception()  # retrieved: later users re-raise it themselves
                    feed._ready = None
                    raise
                feed._ready.set_result(None)
                feed._task = asyncio.get_running_loop().create_task(feed._watch(client))
            else:
                await asyncio.shield(feed._ready)
        except BaseException:
            await feed.detach()
            raise
        return feed

    async def detach(self) -> None:
        """A node is done with the feed; the last one stops the watch."""
        self._users -= 1
        if self._users > 0 or self._client is None:
            return
        self._feeds.get(self._client, {}).pop(self._keys.control_prefix, None)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Let it end (its watch stream closes) before the caller closes the loop.
            await asyncio.gather(task, return_exceptions=True)

    async def _load(self, deadline: Deadline) -> bool:
        """Mirror the ``ctl/`` keys; True when torch's state key exists (in the same read)."""
        assert self._client is not None
        prefix = self._keys.control_prefix
        response = await self._client.txn_idempotent(rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix))),
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self._keys.state, count_only=True)),
        ]), deadline, f"Reading {prefix.decode()!r}")
        control = _Control(revision=int(response.header.revision))
        for kv in response.responses[0].response_range.kvs:
            self._apply(control, bytes(kv.key), bytes(kv.value))
        self.control = control
        self._notify()
        return bool(response.responses[1].response_range.count)

    def _apply(self, control: _Control, key: bytes, value: bytes | None) -> bool:
        """Mirror one ``ctl/`` key (``value`` None: deleted); False when the change is none a
        waiting node acts on (the run lease's key)."""
        parsed = self._keys.parse_native(key)
        if parsed is None:
            return False
        if parsed.kind == "closed":
            control.closed = value is not None
        elif parsed.kind == "run_lease":
            control.run_lease = int(value, 16) if value else 0
            return False
        elif parsed.kind == "seal":
            if value is None:
                control.seals.pop(parsed.round, None)
            else:
                control.seals[parsed.round] = Seal.decode(value)
        elif parsed.kind == "waiting":
            if value is None:
                control.waiting.discard(parsed.round)
            else:
                control.waiting.add(parsed.round)
        return True

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def wake(self) -> None:
        """Wake every waiting node to look again (a node's own lease was lost)."""
        self._notify()

    async def _watch(self, client: EtcdClient) -> None:
        """Keep the mirror current: one watch, resumed after every break."""
        prefix = self._keys.control_prefix
        backoff = _WATCH_BACKOFF_INITIAL
        while True:
            try:
                async with contextlib.aclosing(client.watch(
                    prefix, self.control.revision + 1,
                    Deadline.after(client.config.read_timeout),
                    range_end=utils.prefix_range_end(prefix),
                )) as events:
                    async for event in events:
                        if self._apply(self.control, event.key, event.value):
                            self._notify()
                        self.control.revision = event.revision
                        backoff = _WATCH_BACKOFF_INITIAL
            except CompactedError:
                with contextlib.suppress(EtcdConnectionError):
                    await self._load(Deadline.after(client.config.read_timeout))
            except EtcdConnectionError as exc:
                log.debug("the control watch of %r broke (%s); resuming", self._keys.run_id, exc)
            except Exception as exc:  # the mirror must outlive a bad value
                log.warning("the control watch of %r failed (%s); reading the keys afresh",
                            self._keys.run_id, exc)
                with contextlib.suppress(Exception):
                    await self._load(Deadline.after(client.config.read_timeout))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)


async def run_lease(client: EtcdClient, keys: RunKeys, ttl: int, deadline: Deadline) -> int:
    """The run lease of a native run: the one ``ctl/lease`` names, else a new lease of
    ``ttl`` seconds that this call names there (exactly one of concurrent callers wins)."""
    current = (await client.get(keys.run_lease, deadline)).kvs
    if current:
        return int(current[0].value, 16)
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
        """The lease last used (0: none yet); a node's mirror may set the one it saw."""

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


async def close_native_run(client: EtcdClient, keys: RunKeys, deadline: Deadline, *,
                           ttl: int = DEFAULT_TTL, closed_by: bytes = b"operator") -> None:
    """Close a native run (from a node, or from outside it): waiting nodes get
    :class:`RunClosedError`, standbys :class:`StandbyExitError`. The ``closed`` key lives on
    the run lease, so it expires with the run's other shared keys."""
    await RunLease(client, keys, ttl).write(
        lambda lease: client.put(keys.closed, closed_by, lease, deadline), deadline)


def _torch_run(keys: RunKeys) -> HandlerMismatchError:
    return HandlerMismatchError(
        f"The run {keys.run_id!r} is driven by handler=torch (its state key "
        f"{keys.state.decode()!r} exists); this node uses handler=native. Give every node of "
        "a run the same --rdzv-conf handler=..., or use another --rdzv-id.")


async def refuse_native_run(client: EtcdClient, keys: RunKeys, deadline: Deadline) -> None:
    """For torch's handler: raise if the run is a native one (one run, one protocol).

    Raises:
        HandlerMismatchError: the run has native keys.
    """
    response = await client.range(rpc.RangeRequest(
        key=keys.native_prefix, range_end=utils.prefix_range_end(keys.native_prefix),
        count_only=True), deadline, f"Reading {keys.native_prefix.decode()!r}")
    if response.count:
        raise HandlerMismatchError(
            f"The run {keys.run_id!r} is driven by handler=native (it has keys under "
            f"{keys.native_prefix.decode()!r}); this node uses handler=torch. Give every node "
            "of a run the same --rdzv-conf handler=..., or use another --rdzv-id.")


class AsyncNativeRendezvous:
    """One node's side of a native rendezvous, as coroutines, without torch.

    Args:
        client: the connection to etcd; its ``read_timeout`` bounds every call.
        keys: the run's keys.
        settings: torch's rendezvous settings.
        node: this node; a new one for this process by default.
    """

    def __init__(self, client: EtcdClient, keys: RunKeys, settings: NativeSettings,
                 node: NodeId | None = None) -> None:
        self._client = client
        self._keys = keys
        self._settings = settings
        self._node = node or NodeId.generate()
        self._feed = _ControlFeed.detached(keys)
        #: Taken by the first node that writes a shared key (a seal, the close), not at
        #: start: N nodes starting at once would each grant one.
        self._run_lease = RunLease(client, keys, settings.ttl)
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._node_lease = 0
        self._member_key: bytes | None = None
        self._member_revision = 0
        self._round = 0
        self._admission: Admission | None = None
        self._last_waiting = 0
        #: Whether this node stands by beyond max_nodes (torch's redundancy list).
        self._standby = False

    @property
    def node(self) -> NodeId:
        return self._node

    @property
    def keys(self) -> RunKeys:
        return self._keys

    @property
    def settings(self) -> NativeSettings:
        return self._settings

    @property
    def admission(self) -> Admission | None:
        """The round this node was last admitted to, if any."""
        return self._admission

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    # --- the node's life: leases, the control feed, keep-alives ------------------------------

    @property
    def _control(self) -> _Control:
        return self._feed.control

    @property
    def _changed(self) -> asyncio.Event:
        return self._feed.changed

    async def start(self) -> None:
        """Take this node's lease, mirror ``ctl/`` and start the keep-alive loop.

        :meth:`next_rendezvous` starts the node when needed; call it to fail early.

        Raises:
            HandlerMismatchError: torch's handler drives this run.
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            deadline = self._deadline()
            self._feed = await _ControlFeed.attach(self._client, self._keys, deadline)
            try:
                self._node_lease = await self._client.grant_lease(self._settings.node_ttl,
                                                                  deadline)
            except BaseException:
                await self._feed.detach()
                raise
            self._tasks = [asyncio.get_running_loop().create_task(self._keep_alive())]
            self._started = True

    async def _keep_alive(self) -> None:
        """Renew this node's lease and the run lease every ``keep_alive_interval``."""
        settings = self._settings
        unreachable_since: float | None = None
        run_lease_every = run_lease_renewal_period(settings)
        run_lease_renewed = -math.inf
        # At least three renewals per TTL, so that one late renewal never lets it lapse.
        every = min(settings.keep_alive_interval, settings.node_ttl / 3)
        while True:
            await asyncio.sleep(every)
            deadline = Deadline.after(settings.heartbeat_timeout)
            try:
                lease = self._node_lease
                if lease and await self._client.keep_alive(lease, deadline) <= 0 \
                        and self._node_lease == lease:
                    log.warning("The lease of node %s in run %r expired (etcd lost it, or the "
                                "node missed %d keep-alives); it joins again with a new one.",
                                self._node, self._keys.run_id,
                                settings.keep_alive_max_attempt)
                    self._node_lease = 0
                    self._feed.wake()  # a waiting node re-joins at once
                if self._control.run_lease and \
                        time.monotonic() - run_lease_renewed >= run_lease_every:
                    await self._client.keep_alive(self._control.run_lease, deadline)
                    run_lease_renewed = time.monotonic()
            except Exception as exc:  # this loop must outlive every failure
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning("etcd is unreachable; node %s keeps training and retries its "
                                "keep-alive every %g s (%s)", self._node, every, exc)
                continue
            if unreachable_since is not None:
                log.warning("etcd is reachable again after %.0f s; node %s kept its lease",
                            time.monotonic() - unreachable_since, self._node)
                unreachable_since = None

    # --- the rendezvous -----------------------------------------------------------------

    async def next_rendezvous(self) -> Admission:
        """Join the next round and return this node's rank in it once it is sealed.

        Raises:
            RunClosedError: the run is closed (:class:`StandbyExitError` for a node that
                stood by beyond ``max_nodes``: it may exit cleanly).
            JoinTimeoutError: no round admitted this node within ``join_timeout``.
            HandlerMismatchError: the run is driven by torch's handler.
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        settings = self._settings
        give_up_at = time.monotonic() + settings.join_timeout
        await self.start()
        self._admission = None
        if self._control.closed:
            raise RunClosedError(f"The rendezvous {self._keys.run_id!r} is closed.")
        counts: tuple[int, int] | None = \
            await self._join(max(self._control.seals, default=0) + 1)
        self._standby = False
        seal_at = math.inf
        check_at = 0.0
        unreachable: EtcdConnectionError | None = None
        stood_by = False
        while True:
            changed = self._changed
            if self._control.closed:
                await self._leave_round()
                if self._standby:
                    raise StandbyExitError(f"The rendezvous {self._keys.run_id!r} is closed, "
                                           "terminating pending rendezvous.")
                raise RunClosedError(f"The rendezvous {self._keys.run_id!r} is closed.")
            now = time.monotonic()
            if stood_by and not self._standby:
                give_up_at = now + settings.join_timeout  # no longer a standby: a whole one
            stood_by = self._standby
            if now >= give_up_at and self._round not in self._control.seals:
                if self._standby:
                    # As torch's redundancy list: a standby waits without a deadline, and
                    # gets a whole join_timeout once it stops standing by.
                    give_up_at = now + settings.join_timeout
                else:
                    await self._leave_round()
                    raise JoinTimeoutError(
                        f"The node {self._node} was not admitted to a round of the rendezvous "
                        f"{self._keys.run_id!r} within join_timeout={settings.join_timeout:g} "
                        "s." + (f" etcd did not answer: {unreachable}" if unreachable else ""))
            try:
                seal = self._control.seals.get(self._round)
                latest = max(self._control.seals, default=0)
                if (seal is None and latest >= self._round) or not self._node_lease:
                    # The run moved on while this node's mirror lagged, or its lease expired
                    # (its key with it): join the open round afresh.
                    counts = await self._join(max(latest, self._round - 1) + 1)
                    seal_at, check_at = math.inf, 0.0
                    continue
                if seal is not None:
                    admission = await self._admit(seal)
                    if admission is not None:
                        self._admission = admission
                        return admission
                    self._standby = seal.size >= settings.max_nodes
                    counts = await self._join(self._round + 1)
                    seal_at, check_at = math.inf, 0.0
                    continue
                if now >= seal_at:
                    if not await self._seal(self._round):
                        seal_at = math.inf  # too few nodes now; the next check decides again
                    check_at = 0.0
                    continue
                if now >= check_at:
                    seal_at = min(seal_at, await self._check_round(now, counts))
                    counts = None  # the join's counts are used once; later checks read afresh
                    check_at = now + settings.keep_alive_interval
                    if seal_at <= now:
                        continue
                unreachable = None
            except EtcdConnectionError as exc:
                # etcd away: a waiting node keeps waiting (until join_timeout), as the
                # training nodes keep training; it looks again on the next tick.
                if unreachable is None:
                    log.warning("etcd is unreachable; node %s keeps waiting for a round of "
                                "%r (%s)", self._node, self._keys.run_id, exc)
                unreachable = exc
                counts, check_at = None, now + settings.keep_alive_interval
                seal_at = max(seal_at, check_at) if seal_at < math.inf else seal_at
            wake_at = min(give_up_at, seal_at, check_at)
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({waiter}, timeout=max(0.0, wake_at - time.monotonic()))
            finally:
                waiter.cancel()
            if changed.is_set():
                check_at = 0.0  # a ctl/ change: look again (a few times per round)

    async def _check_round(self, now: float, counts: tuple[int, int] | None = None) -> float:
        """Look at this node's open round; return when to seal it (now: at once).

        ``counts`` are the nodes of this round and of the previous one, if just read. While
        members of the previous round still hold their keys, the round waits (one round
        trains at a time, as torch's wait list waits for the round to change).
        """
        settings, round_ = self._settings, self._round
        joined, members_left = counts if counts is not None else await self._counts()
        previous = self._control.seals.get(round_ - 1)
        if previous is not None and members_left > 0:
            # The previous round still trains: ask its members to come over, if there
            # is room for this node (else it stands by).
            room = previous.size < settings.max_nodes or members_left < previous.size
            self._standby = not room
            if room and round_ not in self._control.waiting:
                # Create-only: N waiters racing make one marker, one ctl/ event.
                marker = self._keys.waiting(round_)
                await self._client.txn_idempotent(rpc.TxnRequest(
                    compare=[Expect.absent().compare(marker)],
                    success=[rpc.RequestOp(request_put=rpc.PutRequest(
                        key=marker, value=self._node.name, lease=self._node_lease))],
                ), self._deadline(), f"Marking round {round_} as awaited")
            return math.inf
        if joined >= settings.max_nodes:
            return now
        if joined >= settings.min_nodes:
            return now + settings.last_call_timeout
        return math.inf

    async def _count(self, prefix: bytes, *, end: bytes | None = None,
                     revision: int = 0) -> int:
        request = rpc.RangeRequest(
            key=prefix, range_end=end if end is not None else utils.prefix_range_end(prefix),
            count_only=True, revision=revision, max_create_revision=revision)
        response = await self._client.range(request, self._deadline(),
                                            f"Counting {prefix.decode(errors='replace')!r}")
        return int(response.count)

    async def _join(self, round_: int) -> tuple[int, int]:
        """Move this node's key into ``round_``: one Txn, which also leaves its old round
        and counts the nodes in this round and the previous one (returned, in that order)."""
        deadline = self._deadline()
        if not self._node_lease:
            self._node_lease = await self._client.grant_lease(self._settings.node_ttl, deadline)
        key = self._keys.member(round_, self._node.name)
        ops = [] if self._member_key is None else [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._member_key))]

        def request() -> rpc.TxnRequest:
            value = json.dumps({"joined_at": time.time()}).encode()
            # Guarded by the absence of torch's state: one run, one protocol.
            return rpc.TxnRequest(compare=[Expect.absent().compare(self._keys.state)], success=[
                *ops,
                rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value,
                                                         lease=self._node_lease)),
                *self._count_ops(round_),
            ])

        what = f"Joining round {round_} of {self._keys.run_id!r}"
        try:
            response = await self._client.txn_idempotent(request(), deadline, what)
        except LeaseNotFoundError:
            self._node_lease = await self._client.grant_lease(self._settings.node_ttl, deadline)
            response = await self._client.txn_idempotent(request(), deadline, what)
        if not response.succeeded:
            raise _torch_run(self._keys)
        self._member_key, self._round = key, round_
        self._member_revision = int(response.header.revision)
        joined, previous = response.responses[-2:]
        return int(joined.response_range.count), int(previous.response_range.count)

    def _count_ops(self, round_: int) -> list[rpc.RequestOp]:
        """Count the join keys of ``round_`` and of the round before it."""
        return [rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=prefix, range_end=utils.prefix_range_end(prefix), count_only=True))
                for prefix in (self._keys.round_prefix(round_),
                               self._keys.round_prefix(round_ - 1))]

    async def _counts(self) -> tuple[int, int]:
        """The nodes in this node's round and in the previous one: one read."""
        response = await self._client.txn_idempotent(
            rpc.TxnRequest(success=self._count_ops(self._round)), self._deadline(),
            f"Counting the nodes of round {self._round}")
        joined, previous = response.responses
        return int(joined.response_range.count), int(previous.response_range.count)

    async def _leave_round(self) -> None:
        if self._member_key is not None:
            with contextlib.suppress(EtcdConnectionError):
                await self._client.delete(self._member_key, self._deadline())
            self._member_key = None

    async def _admit(self, seal: Seal) -> Admission | None:
        """This node's rank in the sealed round, or None when the roster left it out."""
        key = self._member_key
        assert key is not None
        prefix = self._keys.round_prefix(seal.round)
        # One read at the cutoff: is this node's key in the roster (it may have joined after
        # the cutoff, or lost its key with an expired lease before it), and how many roster
        # keys sort before it.
        try:
            response = await self._client.txn_idempotent(rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=key, count_only=True, revision=seal.cutoff,
                    max_create_revision=seal.cutoff)),
                rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=prefix, range_end=key, count_only=True, revision=seal.cutoff,
                    max_create_revision=seal.cutoff)),
            ]), self._deadline(), f"Reading this node's rank in round {seal.round}")
        except CompactedError as exc:
            raise CompactedError(
                f"Round {seal.round} of {self._keys.run_id!r} was sealed at revision "
                f"{seal.cutoff}, which etcd compacted before this node read its rank: keep "
                "etcd's --auto-compaction-retention above a minute, and compact_interval off "
                f"for torch-handler runs on the same etcd ({exc})", exc.compact_revision,
            ) from exc
        mine, before = (int(op.response_range.count) for op in response.responses)
        if not mine:
            return None
        return Admission(seal.round, before, seal.size)

    async def _seal(self, round_: int) -> bool:
        """Try to seal ``round_`` with the nodes that joined it; True if it is sealed now."""
        settings, prefix = self._settings, self._keys.round_prefix(round_)
        if round_ in self._control.seals:
            return True  # another node was quicker; its seal is what counts
        deadline = self._deadline()
        response = await self._client.range(
            rpc.RangeRequest(key=prefix, range_end=utils.prefix_range_end(prefix),
                             count_only=True),
            deadline, f"Counting round {round_}")
        joined, cutoff = int(response.count), int(response.header.revision)
        if joined < settings.min_nodes:
            return False
        if joined > settings.max_nodes:
            cutoff, joined = await self._cap(prefix, cutoff, deadline)
        seal = Seal(round_, cutoff, joined, time.time(), str(self._node))
        self._run_lease.lease_id = self._run_lease.lease_id or self._control.run_lease
        result = await compare_and_swap(
            self._client, self._keys.seal(round_), Expect.absent(), seal.encode(), deadline,
            f"Sealing round {round_} of {self._keys.run_id!r}", lease=self._run_lease,
            tagged=True,
        )
        if not result.applied and result.value is not None:
            # Another node sealed it: take its seal now rather than wait for the watch.
            self._control.seals.setdefault(round_, Seal.decode(result.value))
        if result.applied:
            log.info("node %s sealed round %d of %r with %d nodes", self._node, round_,
                     self._keys.run_id, joined)
            # Cleanup only: a node still in an old round holds its own key.
            with contextlib.suppress(EtcdConnectionError):
                await self._client.delete(self._keys.seal(round_ - 2), deadline)
                await self._client.delete(self._keys.waiting(round_), deadline)
        return True

    async def _cap(self, prefix: bytes, revision: int, deadline: Deadline) -> tuple[int, int]:
        """The cutoff that admits the first ``max_nodes`` joiners, and the roster's size."""
        limit = self._settings.max_nodes
        while True:
            first = await self._client.range(rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix), revision=revision,
                sort_target=rpc.RangeRequest.CREATE, sort_order=rpc.RangeRequest.ASCEND,
                limit=limit, keys_only=True), deadline, "Reading the first joiners")
            cutoff = int(first.kvs[-1].create_revision)
            size = await self._count(prefix, revision=cutoff)
            if size <= limit:
                return cutoff, size
            revision = cutoff  # keys deleted after the cutoff still count there: go earlier

    # --- what the agent asks between rounds --------------------------------------------------

    async def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round (0 when none may be admitted).

        Reads etcd only while some node waits; when etcd does not answer, returns the last
        value it knew, with a warning, rather than failing the agent.
        """
        if self._admission is None:
            return 0
        next_round = self._admission.round + 1
        if next_round not in self._control.waiting:
            self._last_waiting = 0
            return 0
        try:
            self._last_waiting = await self._count(self._keys.round_prefix(next_round))
        except EtcdConnectionError as exc:
            log.warning("etcd is unreachable; num_nodes_waiting answers its last value, %d "
                        "(%s)", self._last_waiting, exc)
        return self._last_waiting

    async def is_closed(self) -> bool:
        """Whether the run is closed; from the watched mirror when etcd does not answer."""
        try:
            return bool((await self._client.get(self._keys.closed, self._deadline())).kvs)
        except EtcdConnectionError as exc:
            log.warning("etcd is unreachable; is_closed answers from its last view (%s)", exc)
            return self._control.closed

    async def set_closed(self) -> None:
        """Close the run: nodes waiting for a round get :class:`RunClosedError`."""
        await self.start()
        await close_native_run(self._client, self._keys,
                               Deadline.after(self._settings.close_timeout),
                               ttl=self._settings.ttl, closed_by=self._node.name)

    async def leave(self) -> None:
        """Leave the run now, without closing it: revoking this node's lease deletes its
        keys at once, so the others see the departure immediately."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._started:
            await self._feed.detach()
        lease, self._node_lease = self._node_lease, 0
        self._started, self._member_key, self._admission = False, None, None
        if lease:
            await self._client.revoke_lease(lease, self._deadline())

    async def shutdown(self) -> bool:
        """torch's ``shutdown``: close the run for everyone, then leave it.

        Returns False (with a warning) when etcd did not answer.
        """
        try:
            await self.set_closed()
        except EtcdConnectionError as exc:
            log.warning("The node %s failed to shut down the rendezvous %r: %s", self._node,
                        self._keys.run_id, exc)
            return False
        finally:
            with contextlib.suppress(EtcdConnectionError):
                await self.leave()
        return True
