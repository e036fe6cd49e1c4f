"""The run's ``ctl/`` keys, read one way: :class:`ControlView` parses them, for the nodes,
:class:`~etcd_rdzv.admin.RendezvousAdmin` and the exporter alike; :class:`ControlFeed`
keeps one view current with one watch, for every node of a run that shares a client.

The keys (laid out in :mod:`etcd_rdzv.keys`): ``ctl/seal/<round>`` (a :class:`~.model.Seal`),
``ctl/wait/<round>`` (a node waits to be admitted to that round), ``ctl/closed`` (who closed
the run) and ``ctl/lease`` (the run lease's id, in hex; the key lives on that lease).

**A value this version does not understand** (another program wrote the key) is left out of
the view, named in :attr:`ControlView.unreadable` and logged once: a node must outlive a bad
value, and nodes and operators must see the same run, so both skip it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from aetcd import rpc, utils

from .._connection import UNTIL_CANCELLED, EtcdClient
from ..deadline import Deadline
from ..errors import CompactedError, EtcdRendezvousError
from ..keys import RunKeys
from .model import Seal

__all__ = ["ControlChange", "ControlFeed", "ControlSnapshot", "ControlView"]

log = logging.getLogger(__name__)

#: Before reading the keys afresh after an unexpected failure of the watch: long enough not
#: to spin on a bug, short next to a node's lease TTL.
_AFTER_A_BUG = 1.0
#: Unreadable keys already logged in this process.
_reported: set[bytes] = set()

#: What one change of a ``ctl/`` key means to somebody who acts on it.
ControlChange = Literal["sealed", "unsealed", "waiting", "not_waiting", "closed", "reopened",
                        "run_lease"]


@dataclass(frozen=True)
class ControlSnapshot:
    """The control view at one moment, frozen: what :func:`~.decide.decide` reads."""

    seals: Mapping[int, Seal]
    waiting: frozenset[int]
    closed: bool
    revision: int
    """The revision of the last change the snapshot shows."""
    taken: frozenset[int] = frozenset()
    """Rounds whose seal key holds a value this version cannot read: no node can be
    admitted to them, so nodes join a later round."""

    @property
    def latest_round(self) -> int:
        """The latest sealed (or taken) round (0: none)."""
        return max(max(self.seals, default=0), max(self.taken, default=0))


@dataclass
class ControlView:
    """The ``ctl/`` keys of one run, parsed; :meth:`apply` keeps it current, one key at a
    time, from a read or a watch."""

    keys: RunKeys
    seals: dict[int, Seal] = field(default_factory=dict)
    waiting: set[int] = field(default_factory=set)
    """The rounds some node waits to be admitted to."""
    closed_by: str | None = None
    """Who closed the run (a node's name, or ``operator``); None while it is open."""
    run_lease: int = 0
    """The run lease the shared keys live on (0: none yet)."""
    revision: int = 0
    """The revision the view is current as of."""
    unreadable: set[bytes] = field(default_factory=set)
    """Keys whose value this version does not understand (left out of the view)."""
    _snapshot: ControlSnapshot | None = field(default=None, init=False, repr=False,
                                              compare=False)
    """The last snapshot, shared by every node of the feed until the next change: thousands
    of nodes on one client each look at the view several times a round."""

    @property
    def closed(self) -> bool:
        return self.closed_by is not None

    @property
    def latest(self) -> Seal | None:
        """The latest sealed round, if any."""
        return self.seals[max(self.seals)] if self.seals else None

    @property
    def taken(self) -> frozenset[int]:
        """Rounds whose seal key holds a value this version cannot read."""
        return frozenset(parsed.round for parsed in map(self.keys.parse_native, self.unreadable)
                         if parsed is not None and parsed.kind == "seal")

    @property
    def latest_round(self) -> int:
        """The latest sealed (or taken) round (0: none)."""
        return max(max(self.seals, default=0), max(self.taken, default=0))

    def snapshot(self) -> ControlSnapshot:
        """The view now, frozen (the same object until the next change)."""
        if self._snapshot is None:
            self._snapshot = ControlSnapshot(dict(self.seals), frozenset(self.waiting),
                                             self.closed, self.revision, self.taken)
        return self._snapshot

    def apply(self, key: bytes, value: bytes | None) -> ControlChange | None:
        """Mirror one key (``value`` None: deleted); what the change means, or None when it
        changes nothing (a key of no known kind, a value that did not change the view)."""
        parsed = self.keys.parse_native(key)
        if parsed is None or parsed.kind == "member":
            return None
        self._snapshot = None
        self.unreadable.discard(key)
        if parsed.kind == "closed":
            was = self.closed
            self.closed_by = None if value is None else value.decode(errors="replace")
            if was == self.closed:
                return None
            return "closed" if self.closed else "reopened"
        if parsed.kind == "run_lease":
            try:
                self.run_lease = int(value, 16) if value else 0
            except ValueError:
                self._unreadable(key, value)
                return None
            return "run_lease"
        if parsed.kind == "seal":
            if value is None:
                return "unsealed" if self.seals.pop(parsed.round, None) else None
            try:
                seal = Seal.decode(value)
            except ValueError:
                self._unreadable(key, value)
                return None
            new = parsed.round not in self.seals
            self.seals[parsed.round] = seal
            return "sealed" if new else None
        if value is None:
            if parsed.round not in self.waiting:
                return None
            self.waiting.discard(parsed.round)
            return "not_waiting"
        if parsed.round in self.waiting:
            return None
        self.waiting.add(parsed.round)
        return "waiting"

    def _unreadable(self, key: bytes, value: bytes | None) -> None:
        self.unreadable.add(key)
        if key not in _reported:  # once per process: views are rebuilt (a scrape, a status)
            _reported.add(key)
            log.warning("%r holds %r, which this version of etcd_rdzv does not understand; "
                        "left out (another program wrote it?)", key, (value or b"")[:80])


class ControlFeed:
    """One run's :class:`ControlView`, kept current by one watch, for every node of the run
    that shares a client (in production one node per process; a harness runs thousands).

    Nodes wait on :attr:`changed`, which is set (and replaced) on every change a waiting
    node acts on: a seal, a waiting marker, the close (and by :meth:`wake`).
    """

    _feeds: ClassVar[weakref.WeakKeyDictionary[object, dict[bytes, ControlFeed]]] = \
        weakref.WeakKeyDictionary()

    def __init__(self, client: EtcdClient | None, keys: RunKeys) -> None:
        self._client = client
        self._keys = keys
        self.view = ControlView(keys)
        self.changed = asyncio.Event()
        self._users = 0
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self.failure: EtcdRendezvousError | None = None
        """Why the view stopped following etcd for good (permissions, TLS); None while it
        follows. A node waiting on the feed raises it."""

    @classmethod
    def detached(cls, keys: RunKeys) -> ControlFeed:
        """An empty view, until a node starts."""
        return cls(None, keys)

    @classmethod
    async def attach(cls, client: EtcdClient, keys: RunKeys, deadline: Deadline) -> ControlFeed:
        """The feed of ``keys``'s run on ``client``: loaded and watched by its first user.

        Raises:
            HandlerMismatchError: torch's handler drives this run.
        """
        from .run import torch_run_error

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
                        raise torch_run_error(keys)
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

    def wake(self) -> None:
        """Wake every waiting node to look again (a node's own lease was lost)."""
        self.changed.set()
        self.changed = asyncio.Event()

    async def _load(self, deadline: Deadline) -> bool:
        """Read the ``ctl/`` keys afresh; True when torch's state key exists (same read)."""
        assert self._client is not None
        prefix = self._keys.control_prefix
        response = await self._client.txn_idempotent(rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix))),
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self._keys.state, count_only=True)),
        ]), deadline, f"Reading {prefix.decode()!r}")
        view = ControlView(self._keys, revision=int(response.header.revision))
        for kv in response.responses[0].response_range.kvs:
            view.apply(bytes(kv.key), bytes(kv.value))
        self.view = view
        self.wake()
        return bool(response.responses[1].response_range.count)

    async def _watch(self, client: EtcdClient) -> None:
        """Keep the view current: follow the prefix, read afresh after a compaction. A
        permanent failure ends it, as :attr:`failure`."""
        prefix = self._keys.control_prefix
        while True:
            try:
                async with contextlib.aclosing(client.follow(
                    prefix, self.view.revision + 1, range_end=utils.prefix_range_end(prefix),
                )) as events:
                    async for event in events:
                        change = self.view.apply(event.key, event.value)
                        self.view.revision = event.revision
                        if change is not None and change != "run_lease":
                            self.wake()
                raise AssertionError("a follow ends only by raising")
            except CompactedError:
                log.info("the control watch of %r: history compacted; reading afresh",
                         self._keys.run_id)
            except EtcdRendezvousError as exc:
                self.failure = exc
                self.wake()
                return
            except Exception:  # a bug here must not leave the nodes blind: read afresh
                log.exception("the control watch of %r failed; reading the keys afresh",
                              self._keys.run_id)
                await asyncio.sleep(_AFTER_A_BUG)
            try:
                await self._load(UNTIL_CANCELLED)  # through an outage, as the follow does
            except EtcdRendezvousError as exc:
                self.failure = exc
                self.wake()
                return
