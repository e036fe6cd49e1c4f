"""Rendezvous runs seen from outside: list, inspect, watch, close and delete them. No torch.

:class:`RendezvousAdmin` is the async API an orchestrator (or the ``etcd-rdzv`` command)
uses next to the agents. It understands both handlers a run may be driven by:

* ``handler=torch``: torch's pickled state, read only through the restricted unpickler of
  :mod:`etcd_rdzv.state`, so a hostile state is refused rather than run;
* ``handler=native``: the keys of :mod:`etcd_rdzv.native`, read as they are; the ``ctl/``
  keys (seals, waiting markers, ``closed``, the run lease) through the nodes' own parser,
  :class:`~etcd_rdzv.native.ControlView`, so operators see the run its nodes see, and a
  value the nodes skip is skipped here too (and named in
  :attr:`NativeRunView.unreadable_keys`). A node's role and rank are derived from its join
  key, the latest seal and the waiting markers (:class:`NativeRunView`); its rank is its
  place in the roster read at the seal's cutoff revision, which is how the node itself
  computed it. Times (``joined_at``, ``sealed_at``) are the nodes' own clocks.

A native run is alive while any node holds its lease, even when it writes nothing for
hours (a training job does not): its idle time is 0 then, so ``cleanup`` keeps it.

The keys it reads are laid out in :mod:`etcd_rdzv.keys`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from aetcd import rpc, utils

from ._connection import UNTIL_CANCELLED, EtcdClient, WatchEvent
from ._lease import lease_window
from .backend import AsyncEtcdRendezvousBackend
from .codec import StateCodec
from .config import DEFAULT_KEY_PREFIX, DEFAULT_TTL, validate_key_prefix
from .deadline import Deadline
from .errors import (
    CompactedError,
    EtcdConnectionError,
    EtcdStateError,
    NotATorchStateError,
    RunNotFoundError,
)
from .keys import RunKeys, parse_run_key, runs_prefix
from .native import (
    ControlChange,
    ControlView,
    NodeId,
    Seal,
    close_native_run,
    run_lease_idle_seconds,
)
from .state import RendezvousStateView, decode_state, encode_closed

__all__ = [
    "Handler",
    "NativeChange",
    "NativeEvent",
    "NativeNodeView",
    "NativeRole",
    "NativeRunView",
    "NativeState",
    "RendezvousAdmin",
    "RunInfo",
    "StateSnapshot",
]

log = logging.getLogger(__name__)

#: Lease look-ups in flight at once while listing runs or reading a native run's nodes.
_LEASE_CONCURRENCY = 16

@dataclass(frozen=True)
class RunInfo:
    """One run under the key prefix, as :meth:`RendezvousAdmin.list_runs` found it."""

    run_id: str
    revision: int | None
    """The state's ``mod_revision`` (its token); None when the run has store keys only."""
    created_revision: int | None
    """The revision at which the state key was created."""
    version: int
    """How many times the state was written since it was created (0: no state)."""
    state_bytes: int
    """The state's stored size (header, possibly compressed)."""
    lease: int
    """The lease of the state key (0: none)."""
    store_keys: int
    """How many keys the run's store holds."""
    store_bytes: int
    """The size of the store's values."""
    last_revision: int
    """The newest ``mod_revision`` among the run's keys: its last write."""
    idle_seconds: float | None
    """At least this long has passed since the run's last write; None when unknown (the
    newest key has no lease, or its lease is gone). Measured by etcd's clock from the lease
    of the newest key, which was granted at most one lease window (``ttl/10``, 1 to 60 s)
    before that write; the window is subtracted, so the figure never overstates.

    A native run is not idle while any node holds its lease (0, though a training job
    writes nothing); after its last node left, this is how long ago its nodes last renewed
    the run lease, by the run lease's own policy
    (:func:`~etcd_rdzv.native.run_lease_idle_seconds`)."""
    ttl_left: int | None
    """Seconds until the newest key's lease expires, taking the run's keys along with it
    (torch's writes renew it); for a native run, the run lease's (its nodes renew it).
    None when unknown."""
    state: RendezvousStateView | None
    """The decoded state; None without a state or when it could not be decoded."""
    error: str | None
    """Why the state could not be decoded, if it could not."""
    not_a_torch_state: bool = False
    """The state key holds something other than torch's rendezvous state (another program
    wrote it): :class:`~etcd_rdzv.errors.NotATorchStateError`, not a corrupt state."""
    handler: Handler | None = None
    """``torch`` (the run has a state), ``native`` (native keys), None (store keys only)."""
    native_keys: int = 0
    """How many keys the run has under its native prefix."""
    native: NativeRunView | None = None
    """For a native run: its round, world size, closed or not, and how many nodes hold a
    lease (figures only: no ranks, no lease times)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (what ``etcd-rdzv list --json`` prints)."""
        state, native = self.state, self.native
        return {
            "run_id": self.run_id,
            "handler": self.handler,
            "revision": self.revision,
            "created_revision": self.created_revision,
            "version": self.version,
            "state_bytes": self.state_bytes,
            "lease": self.lease,
            "store_keys": self.store_keys,
            "store_bytes": self.store_bytes,
            "last_revision": self.last_revision,
            "idle_seconds": None if self.idle_seconds is None else round(self.idle_seconds, 1),
            "ttl_left": self.ttl_left,
            "round": state.round if state is not None else
            native.round if native is not None else None,
            "complete": state.complete if state is not None else
            native.state == "complete" if native is not None else None,
            "closed": state.closed if state is not None else
            native.closed if native is not None else None,
            "world_size": state.world_size if state is not None else
            native.world_size if native is not None else None,
            "nodes_alive": native.nodes_alive if native is not None else None,
            "native_keys": self.native_keys,
            "error": self.error,
            "not_a_torch_state": self.not_a_torch_state,
        }


@dataclass(frozen=True)
class StateSnapshot:
    """A run's state at one revision: what :meth:`RendezvousAdmin.watch_state` yields."""

    run_id: str
    revision: int
    """The state's ``mod_revision``; when there is no state, the revision of its deletion
    or of the read that found none."""
    state: RendezvousStateView | None
    """The decoded state; None when the run has no state (not created yet, or deleted)."""
    stored_bytes: int = 0
    """The state's stored size."""
    lease: int = 0
    """The state key's lease (0: none)."""

#: Which rendezvous handler drives a run: torch's (a pickled state) or the native one.
Handler = Literal["torch", "native"]
#: What a node of a native run is doing; see :attr:`NativeNodeView.role`.
NativeRole = Literal["member", "gone", "waiting", "standby", "joining", "late", "stale"]
#: A native run's state; see :attr:`NativeRunView.state`.
NativeState = Literal["joining", "complete", "closed", "no nodes"]
#: What changed in a native run; see :attr:`NativeEvent.change`.
NativeChange = Literal["status", "joined", "left", "sealed", "waiting", "closed", "reopened"]
_ROLES: tuple[NativeRole, ...] = ("member", "gone", "waiting", "standby", "joining", "late",
                                  "stale")


@dataclass(frozen=True)
class NativeNodeView:
    """One node of a native run (``handler=native``), as :class:`NativeRunView` lists it."""

    node: str
    """torch's name of the node, ``<addr>_<pid>_<local_id>`` (the key's own text when it
    is not a node name)."""
    role: NativeRole
    """``member``: in the roster of the latest sealed round and still in that round
    (training). ``gone``: in that roster, but its keys are gone (it left, or its lease
    expired). ``waiting``: in the next round, and a waiting marker asks the members to
    restart and admit it. ``standby``: in the next round, without a marker, while members
    train (beyond ``max_nodes``). ``joining``: in a round no member trains beside (the
    first round, or after every member left); it is sealed once enough nodes joined.
    ``late``: joined the sealed round after its cutoff; it moves on to the next round.
    ``stale``: still in a round older than the latest sealed one."""
    round: int
    """The round of the node's join key (``gone``: the sealed round it was in)."""
    rank: int | None
    """Its rank in the latest sealed round, when it is in the roster (a member that moved
    on to the next round keeps it until that round is sealed); None when it is not, or
    when the roster is unknown (etcd compacted the cutoff revision and members left)."""
    joined_at: float | None
    """When it joined :attr:`round`: Unix time, by the node's clock."""
    lease: int = 0
    """The node's lease (0: gone)."""
    lease_ttl_left: int | None = None
    """Seconds before etcd deletes the node's keys unless it renews its lease (it does
    every ``keep_alive_interval``); None when gone or not read."""
    addr: str | None = None
    pid: int | None = None
    local_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "addr": self.addr, "pid": self.pid,
                "local_id": self.local_id, "role": self.role, "round": self.round,
                "rank": self.rank, "joined_at": self.joined_at, "lease": self.lease,
                "lease_ttl_left": self.lease_ttl_left}


@dataclass(frozen=True)
class NativeRunView:
    """A native run (``handler=native``): its latest sealed round, its nodes, closed or not.

    :meth:`RendezvousAdmin.native_status` fills every field; a listing and a watch's
    events carry the figures only (:attr:`nodes` None, no lease times).
    """

    run_id: str
    revision: int
    """The etcd revision the view is current as of."""
    seal: Seal | None
    """The latest sealed round (round, cutoff revision, size, when, by whom); None when no
    round is sealed."""
    closed: bool
    closed_by: str | None
    """Who closed it: the name of the node that shut down, or ``operator``."""
    counts: Mapping[NativeRole, int]
    """How many nodes have each role (every role is present)."""
    waiting_rounds: frozenset[int]
    """The rounds some node waits to be admitted to (a ``ctl/wait/<round>`` marker)."""
    ranks_known: bool = True
    """False when the roster could not be read at the cutoff (etcd compacted that
    revision) and members left since: ranks are then None."""
    round_started_at: float | None = None
    """When the first node of the latest sealed round joined it (its clock): the round
    took ``seal.sealed_at - round_started_at`` seconds."""
    run_lease: int = 0
    """The run lease, which the run's shared keys (seals, ``closed``) live on (0: none)."""
    run_lease_ttl_left: int | None = None
    """Seconds left on the run lease; the nodes renew it while any lives, so the shared
    keys expire ``ttl`` seconds after the last node leaves. None when not read."""
    unreadable_keys: frozenset[str] = frozenset()
    """``ctl/`` keys whose value this version does not understand (another program wrote
    them): left out of every figure, as the run's nodes leave them out."""
    nodes: tuple[NativeNodeView, ...] | None = None
    """Every node: the roster by rank, then the others by round and name; None when not
    listed (a listing, a watch's events)."""

    @property
    def round(self) -> int | None:
        """The latest sealed round; None before the first is sealed."""
        return self.seal.round if self.seal is not None else None

    @property
    def world_size(self) -> int:
        """The size of the latest sealed round's roster (0: none sealed)."""
        return self.seal.size if self.seal is not None else 0

    @property
    def nodes_alive(self) -> int:
        """The nodes that hold a lease in the run now."""
        return sum(count for role, count in self.counts.items() if role != "gone")

    @property
    def state(self) -> NativeState:
        """``closed``; ``no nodes`` (none holds a lease); ``complete`` (the latest sealed
        round has members training; nodes may wait for the next); else ``joining``."""
        if self.closed:
            return "closed"
        if not self.nodes_alive:
            return "no nodes"
        return "complete" if self.counts["member"] else "joining"

    @property
    def round_seconds(self) -> float | None:
        """How long the latest sealed round took, from its first join to its seal."""
        if self.seal is None or self.round_started_at is None:
            return None
        return self.seal.sealed_at - self.round_started_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (``etcd-rdzv status --json`` prints it under ``native``)."""
        seal = self.seal
        return {
            "round": self.round,
            "state": self.state,
            "closed": self.closed,
            "closed_by": self.closed_by,
            "world_size": self.world_size,
            "cutoff_revision": seal.cutoff if seal is not None else None,
            "sealed_at": seal.sealed_at if seal is not None else None,
            "sealed_by": seal.sealer if seal is not None else None,
            "round_started_at": self.round_started_at,
            "round_seconds": self.round_seconds,
            "ranks_known": self.ranks_known,
            "waiting_rounds": sorted(self.waiting_rounds),
            "nodes_alive": self.nodes_alive,
            "counts": dict(self.counts),
            "run_lease": self.run_lease,
            "run_lease_ttl_left": self.run_lease_ttl_left,
            "unreadable_keys": sorted(self.unreadable_keys),
            "nodes": None if self.nodes is None else [node.to_dict() for node in self.nodes],
        }


@dataclass(frozen=True)
class NativeEvent:
    """One change of a native run, as :meth:`RendezvousAdmin.watch_native` yields it."""

    run_id: str
    revision: int
    """The revision of the change (of the read, for ``status``)."""
    change: NativeChange
    """``status``: the run as read when the watch (re)started (the view lists its nodes).
    ``joined`` / ``left``: :attr:`node` put or lost its key in :attr:`round` (a node that
    moves on to the next round leaves one and joins the other in one revision).
    ``sealed``: :attr:`round` was sealed. ``waiting``: nodes wait to be admitted to
    :attr:`round`: the members' agents restart. ``closed`` / ``reopened``: the ``closed``
    key appeared / went away (it expires with the run lease)."""
    view: NativeRunView
    """The run after the change."""
    round: int | None = None
    node: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "revision": self.revision, "handler": "native",
                "change": self.change, "round": self.round, "node": self.node,
                "native": self.view.to_dict()}


@dataclass
class _RunScan:
    """One run's keys, gathered from :meth:`RendezvousAdmin.list_runs`'s one read of the
    prefix (mutable: filled key by key)."""

    state: Any = None
    """The state's ``KeyValue``, if any."""
    store_keys: int = 0
    store_bytes: int = 0
    newest: Any = None
    """The ``KeyValue`` with the highest ``mod_revision``: the run's last write."""
    native: list[Any] = field(default_factory=list)
    """Every ``KeyValue`` under the native prefix."""


@dataclass(frozen=True)
class _Join:
    """A node's join key: ``round/<round>/<name>``."""

    round: int
    name: bytes
    create_revision: int
    joined_at: float | None
    lease: int


def _node_fields(name: bytes) -> dict[str, Any]:
    """A node's name in keys as :class:`NativeNodeView`'s fields."""
    try:
        node = NodeId.from_name(name)
    except ValueError:
        return {"node": name.decode(errors="replace")}
    return {"node": str(node), "addr": node.addr, "pid": node.pid, "local_id": node.local_id}


def _joined_at(value: bytes) -> float | None:
    try:
        return float(json.loads(value)["joined_at"])
    except (ValueError, KeyError, TypeError):
        return None


#: What a change of a ``ctl/`` key is told as by :meth:`RendezvousAdmin.watch_native`;
#: the others (a seal or a waiting marker gone, the run lease named) change only figures.
_TOLD: Mapping[ControlChange, NativeChange] = {
    "sealed": "sealed", "waiting": "waiting", "closed": "closed", "reopened": "reopened"}


class _NativeKeys:
    """The keys under one run's native prefix, parsed into what a status, a listing and a
    watch show, and kept current by :meth:`apply` as a watch reports changes.

    The ``ctl/`` keys are the nodes' own :class:`~etcd_rdzv.native.ControlView` (one parser,
    so operators see the run as its nodes do, and skip the values they skip); the join keys
    (``round/<r>/<node>``), which nodes only count, are kept here. Counts are kept as keys
    come and go, so a watch of a large run pays O(1) per change, not a pass over every node.
    """

    def __init__(self, keys: RunKeys) -> None:
        self._keys = keys
        self.control = ControlView(keys)
        self.joins: dict[bytes, _Join] = {}
        self._per_round: Counter[int] = Counter()
        self._per_name: Counter[bytes] = Counter()
        #: The latest sealed round's roster, sorted (the order of ranks), with join times.
        self.roster: list[tuple[bytes, float | None]] = []
        self._roster_round: int | None = None
        self._roster_names: frozenset[bytes] = frozenset()
        self._members = 0  # roster nodes still in the roster's round
        self._gone = 0  # roster nodes without any key

    @classmethod
    def load(cls, keys: RunKeys, kvs: Iterable[Any]) -> _NativeKeys:
        native = cls(keys)
        for kv in kvs:
            native.apply(bytes(kv.key), bytes(kv.value), int(kv.lease), int(kv.create_revision))
        native._derive_roster()  # the seals were read before the joins (ctl/ < round/)
        return native

    def apply(self, key: bytes, value: bytes | None, lease: int = 0, create_revision: int = 0,
              ) -> tuple[NativeChange, int | None, bytes | None] | None:
        """Mirror one key (``value`` None: deleted); the change a person would want told,
        as (what, round, node name), or None."""
        parsed = self._keys.parse_native(key)
        if parsed is None:
            return None
        if parsed.kind == "member":
            return self._apply_join(key, _Join(parsed.round, parsed.node_name, create_revision,
                                               _joined_at(value) if value else None, lease),
                                    value is not None)
        change = self.control.apply(key, value)
        if change in ("sealed", "unsealed") and parsed.round in (
                self._roster_round, max(self.control.seals, default=None)):
            self._derive_roster()  # a new latest round, or the latest gone: an older shows
        told = _TOLD.get(change) if change is not None else None
        if told is None:
            return None
        return told, (parsed.round if told in ("sealed", "waiting") else None), None

    def _apply_join(self, key: bytes, join: _Join, present: bool,
                    ) -> tuple[NativeChange, int | None, bytes | None] | None:
        old = self.joins.pop(key, None)
        if old is not None:
            self._count(old, -1)
        if not present:
            return ("left", old.round, old.name) if old is not None else None
        self.joins[key] = join
        self._count(join, +1)
        return ("joined", join.round, join.name) if old is None else None

    def _count(self, join: _Join, delta: int) -> None:
        self._per_round[join.round] += delta
        before = self._per_name[join.name]
        self._per_name[join.name] += delta
        if join.name in self._roster_names:
            if join.round == self._roster_round:
                self._members += delta
            if (before == 0) != (self._per_name[join.name] == 0):
                self._gone -= delta

    def _derive_roster(self) -> None:
        """The latest round's roster from the keys at hand: those joined by the cutoff."""
        seal = self.control.latest
        if seal is None:
            self.set_roster(None, [])
            return
        self.set_roster(seal.round, sorted(
            (join.name, join.joined_at) for join in self.joins.values()
            if join.round == seal.round and join.create_revision <= seal.cutoff))

    def set_roster(self, round_: int | None, roster: list[tuple[bytes, float | None]]) -> None:
        self._roster_round, self.roster = round_, roster
        self._roster_names = frozenset(name for name, _ in roster)
        self._members = sum(1 for join in self.joins.values()
                            if join.round == round_ and join.name in self._roster_names)
        self._gone = sum(1 for name in self._roster_names if not self._per_name[name])

    def _role(self, join: _Join, seal: Seal | None) -> NativeRole:
        """The one rule of roles, for a node that holds a key; :meth:`counts` counts by it."""
        if seal is None:
            return "joining"
        if join.round == seal.round:
            return "member" if join.name in self._roster_names else "late"
        if join.round < seal.round:
            return "stale"
        if join.round in self.control.waiting:
            return "waiting"
        return "standby" if self._members else "joining"

    def counts(self) -> dict[NativeRole, int]:
        """How many nodes have each role, by :meth:`_role`'s rule, without a pass over
        the nodes."""
        counts = dict.fromkeys(_ROLES, 0)
        seal = self.control.latest
        if seal is None:
            counts["joining"] = len(self.joins)
            return counts
        for round_, number in self._per_round.items():
            if round_ == seal.round:
                counts["member"] += self._members
                counts["late"] += number - self._members
            elif round_ < seal.round:
                counts["stale"] += number
            elif round_ in self.control.waiting:
                counts["waiting"] += number
            else:
                counts["standby" if self._members else "joining"] += number
        counts["gone"] = self._gone
        return counts

    def view(self, run_id: str, revision: int, *, with_nodes: bool = False,
             leases: Mapping[int, int] | None = None) -> NativeRunView:
        """The run as :class:`NativeRunView`; ``with_nodes`` lists every node (a pass over
        them), with the seconds left of each lease in ``leases``."""
        control = self.control
        seal = control.latest
        ranks_known = seal is None or len(self.roster) == seal.size
        rank_of = {name: rank for rank, (name, _) in enumerate(self.roster)} \
            if ranks_known else {}
        nodes: tuple[NativeNodeView, ...] | None = None
        if with_nodes:
            leases = leases or {}
            rows = [NativeNodeView(role=self._role(join, seal), round=join.round,
                                   rank=rank_of.get(join.name), joined_at=join.joined_at,
                                   lease=join.lease, lease_ttl_left=leases.get(join.lease),
                                   **_node_fields(join.name))
                    for join in self.joins.values()]
            if seal is not None:
                rows += [NativeNodeView(role="gone", round=seal.round, rank=rank_of.get(name),
                                        joined_at=joined_at, **_node_fields(name))
                         for name, joined_at in self.roster if not self._per_name[name]]
            rows.sort(key=lambda row: (row.rank is None, row.rank or 0, row.round, row.node))
            nodes = tuple(rows)
        return NativeRunView(
            run_id=run_id, revision=revision, seal=seal, closed=control.closed,
            closed_by=control.closed_by, counts=self.counts(),
            waiting_rounds=frozenset(control.waiting), ranks_known=ranks_known,
            round_started_at=min((at for _, at in self.roster if at is not None), default=None),
            run_lease=control.run_lease,
            run_lease_ttl_left=(leases or {}).get(control.run_lease)
            if control.run_lease else None,
            unreadable_keys=frozenset(key.decode(errors="replace")
                                      for key in control.unreadable),
            nodes=nodes)



class RendezvousAdmin:
    """List, inspect, watch, close and delete the rendezvous runs under one key prefix.

    Args:
        client: the connection to etcd; its ``read_timeout`` bounds each call (a watch's
            reads and re-opens too).
        key_prefix: where the runs' keys live, as the agents' ``key_prefix`` option.
        ttl: the TTL given to the state when :meth:`close_run` writes it, in seconds.
        codec: the stored form, for :meth:`close_run`'s write (compression threshold,
            request size limit); the default suits states written with the defaults.
    """

    def __init__(
        self,
        client: EtcdClient,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        ttl: int = DEFAULT_TTL,
        codec: StateCodec | None = None,
    ) -> None:
        self._client = client
        self._prefix = validate_key_prefix(key_prefix)
        self._ttl = ttl
        self._codec = codec or StateCodec()

    @property
    def client(self) -> EtcdClient:
        return self._client

    @property
    def key_prefix(self) -> str:
        return self._prefix

    def state_key(self, run_id: str) -> bytes:
        """The etcd key of ``run_id``'s state."""
        return RunKeys(run_id, self._prefix).state

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    def _decode(self, value: bytes, key: bytes) -> RendezvousStateView:
        return decode_state(self._codec.decode(value, key=key), key=key)

    async def list_runs(self, *, lease_ages: bool = True) -> list[RunInfo]:
        """Every run under the key prefix, sorted by run id.

        A run is any key of the layout in :mod:`etcd_rdzv.keys` (the state, store keys,
        native keys); other keys under the prefix are not runs and are left out. One range
        read of the prefix, then (with ``lease_ages``) one lease look-up per run, for
        ``idle_seconds`` and ``ttl_left``, which are None without. A state that cannot be
        decoded is listed with ``error`` set (and ``not_a_torch_state`` when another program
        wrote it).

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        response = await self._client.get_prefix(runs_prefix(self._prefix), self._deadline())
        revision = int(response.header.revision)
        runs: dict[str, _RunScan] = defaultdict(_RunScan)
        for kv in response.kvs:
            parsed = parse_run_key(self._prefix, bytes(kv.key))
            if parsed is None:
                continue  # not a key of this layout (another prefix nested here, say)
            run_id, kind = parsed
            if kind == "state":
                runs[run_id].state = kv
            elif kind == "native":
                runs[run_id].native.append(kv)
            else:
                runs[run_id].store_keys += 1
                runs[run_id].store_bytes += len(kv.value)
            newest = runs[run_id].newest
            if newest is None or kv.mod_revision > newest.mod_revision:
                runs[run_id].newest = kv
        natives = {run_id: _NativeKeys.load(RunKeys(run_id, self._prefix), keys.native)
                   for run_id, keys in runs.items() if keys.native}
        # A native run's age is its run lease's (its nodes renew it); others', their newest
        # key's lease's.
        renewed = {run_id: native.control.run_lease for run_id, native in natives.items()
                   if native.control.run_lease}
        lease_of = {run_id: renewed.get(run_id) or int(keys.newest.lease)
                    for run_id, keys in runs.items()}
        leases = await self._lease_ages({lease for lease in lease_of.values() if lease}) \
            if lease_ages else {}
        now = time.monotonic()
        infos = []
        for run_id in sorted(runs):
            keys = runs[run_id]
            native = natives[run_id].view(run_id, revision) if run_id in natives else None
            state, error, foreign = None, None, False
            if keys.state is not None:
                try:
                    state = self._decode(bytes(keys.state.value), bytes(keys.state.key))
                except EtcdStateError as exc:
                    error, foreign = str(exc), isinstance(exc, NotATorchStateError)
                if native is not None and error is None:
                    error = (f"the run has both torch's state and keys of handler=native under "
                             f"{RunKeys(run_id, self._prefix).native_prefix.decode()!r}")
            idle, ttl_left = None, None
            lease = leases.get(lease_of[run_id])
            if lease is not None:
                left, granted, read_at = lease
                if run_id in renewed:
                    idle = run_lease_idle_seconds(granted, left, now - read_at)
                else:
                    # lease_window of the granted TTL bounds the window of the TTL it was
                    # granted for (ttl + window), so the figure never overstates; less a
                    # second for etcd's whole-second TTLs.
                    idle = max(0.0, granted - left + (now - read_at) - lease_window(granted) - 1)
                ttl_left = left
            if native is not None and native.nodes_alive:
                idle = 0.0  # its nodes heartbeat: alive, though training writes nothing
            kv = keys.state
            infos.append(RunInfo(
                run_id=run_id,
                revision=int(kv.mod_revision) if kv is not None else None,
                created_revision=int(kv.create_revision) if kv is not None else None,
                version=int(kv.version) if kv is not None else 0,
                state_bytes=len(kv.value) if kv is not None else 0,
                lease=int(kv.lease) if kv is not None else 0,
                store_keys=keys.store_keys,
                store_bytes=keys.store_bytes,
                last_revision=int(keys.newest.mod_revision),
                idle_seconds=idle,
                ttl_left=ttl_left,
                state=state,
                error=error,
                not_a_torch_state=foreign,
                handler="torch" if kv is not None else "native" if native is not None else None,
                native_keys=len(keys.native),
                native=native if kv is None else None,
            ))
        return infos

    async def _lease_ages(self, lease_ids: Iterable[int]) -> dict[int, tuple[int, int, float]]:
        """``lease -> (seconds left, seconds granted, when read)`` for the leases that live."""
        semaphore = asyncio.Semaphore(_LEASE_CONCURRENCY)
        deadline = self._deadline()

        async def one(lease_id: int) -> tuple[int, tuple[int, int, float]]:
            async with semaphore:
                lease = await self._client.lease_status(lease_id, deadline)
                return lease_id, (lease.ttl, lease.granted_ttl, time.monotonic())

        results = await asyncio.gather(*(one(lease_id) for lease_id in lease_ids))
        return {lease_id: info for lease_id, info in results if info[0] >= 0 and info[1] > 0}

    async def snapshot(self, run_id: str) -> StateSnapshot:
        """The run's state now, with its revision (``state`` None when there is none).

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
            EtcdStateError: the state cannot be decoded, or is not a plain torch state.
        """
        key = self.state_key(run_id)
        return self._from_read(run_id, key, await self._client.get(key, self._deadline()))

    async def status(self, run_id: str) -> RendezvousStateView | None:
        """The run's state now; None when the run has no state.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
            EtcdStateError: the state cannot be decoded, or is not a plain torch state.
        """
        return (await self.snapshot(run_id)).state

    async def handler(self, run_id: str) -> Handler | None:
        """Which handler drives the run: ``torch`` (it has a state), ``native`` (it has
        native keys), None (neither: not started, or gone). One read.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        return (await self._handler_at(run_id))[0]

    async def _handler_at(self, run_id: str) -> tuple[Handler | None, int]:
        keys = RunKeys(run_id, self._prefix)
        native = keys.native_prefix
        response = await self._client.txn_idempotent(rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=keys.state, count_only=True)),
            rpc.RequestOp(request_range=rpc.RangeRequest(
                key=native, range_end=utils.prefix_range_end(native), count_only=True)),
        ]), self._deadline(), f"Reading the run {run_id!r}")
        state, natives = (int(op.response_range.count) for op in response.responses)
        handler: Handler | None = "torch" if state else "native" if natives else None
        return handler, int(response.header.revision)

    async def native_status(self, run_id: str) -> NativeRunView | None:
        """A native run now, every node listed: role, rank, join time, lease time left;
        None when the run has no native keys.

        Reads the run's native keys, the roster of the latest sealed round at its cutoff
        revision (the ranks), and each node's lease: 2 reads and a lease look-up per node.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        keys = RunKeys(run_id, self._prefix)
        response = await self._client.get_prefix(keys.native_prefix, self._deadline())
        if not response.kvs:
            return None
        native = _NativeKeys.load(keys, response.kvs)
        await self._read_roster(native, keys)
        run_lease = native.control.run_lease
        leases = await self._lease_ages({join.lease for join in native.joins.values()}
                                        | ({run_lease} if run_lease else set()))
        return native.view(run_id, int(response.header.revision), with_nodes=True,
                           leases={lease: info[0] for lease, info in leases.items()})

    async def _read_roster(self, native: _NativeKeys, keys: RunKeys) -> None:
        """The latest sealed round's roster as its nodes ranked themselves: every join key
        of the round at the cutoff revision. Left as derived from the keys at hand when
        etcd has compacted that revision away."""
        seal = native.control.latest
        if seal is None:
            return
        prefix = keys.round_prefix(seal.round)
        try:
            response = await self._client.range(rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix), revision=seal.cutoff,
                max_create_revision=seal.cutoff), self._deadline(),
                f"Reading the roster of round {seal.round} of {keys.run_id!r}")
        except CompactedError as exc:
            log.info("the roster of round %d of %r: %s", seal.round, keys.run_id, exc)
            return
        native.set_roster(seal.round, [(bytes(kv.key)[len(prefix):], _joined_at(bytes(kv.value)))
                                       for kv in response.kvs])

    async def _follow(self, key: bytes, range_end: bytes, start_revision: int | None,
                      ) -> AsyncGenerator[Any, None]:
        """A read of ``[key, range_end)`` (unless ``start_revision`` is given), then every
        change from the revision after it, as :class:`WatchEvent`, in order.

        The changes come from :meth:`EtcdClient.follow`, which resumes a broken watch from
        the revision after the last change and retries transient failures for as long as
        the iteration goes on. When etcd has compacted the revision it needs, the range is
        read and yielded afresh, then followed from there; that read, too, outlasts an
        outage (:data:`UNTIL_CANCELLED`). Permanent errors (auth, TLS) raise at once.
        """
        watch_from = start_revision
        what = f"Reading {key.decode(errors='replace')!r}"
        while True:
            if watch_from is None:
                response = await self._client.range(
                    rpc.RangeRequest(key=key, range_end=range_end), UNTIL_CANCELLED, what)
                yield response
                watch_from = int(response.header.revision) + 1
            try:
                async with aclosing(self._client.follow(key, watch_from,
                                                        range_end=range_end)) as events:
                    async for event in events:
                        watch_from = event.revision + 1
                        yield event
            except CompactedError as exc:
                log.info("%s; reading afresh", exc)
                watch_from = None

    async def watch_state(
        self, run_id: str, *, start_revision: int | None = None
    ) -> AsyncGenerator[StateSnapshot, None]:
        """The run's state, then every change of it, until the caller stops iterating.

        First the current state (a read; with ``start_revision``, instead, the changes from
        that revision on), then one snapshot per write or deletion, in order, each with its
        revision. The watch survives etcd's failures: when its stream breaks it is opened
        again from the revision after the last one yielded, so no change is lost or
        repeated; when etcd has compacted that revision away, the state is read afresh (the
        changes in between are gone from etcd's history) and watched from there. Transient
        failures are retried for as long as the iteration goes on, with a backoff up to 2 s
        (:meth:`EtcdClient.follow`'s).

        Raises:
            EtcdStateError: a state cannot be decoded, or is not a plain torch state.
            EtcdAuthError: the credentials or permissions were refused; at once.
            EtcdConnectionError: another permanent error (not a
                :class:`~etcd_rdzv.errors.TransientError`); at once.
        """
        key = self.state_key(run_id)
        # What was yielded last: (revision, True) for a state, (0, False) for none. A re-read
        # that finds the same (after a compaction) is not yielded again.
        last: tuple[int, bool] | None = None
        async with aclosing(self._follow(key, b"", start_revision)) as changes:
            async for change in changes:
                if isinstance(change, WatchEvent):
                    if change.value is None:
                        snapshot = StateSnapshot(run_id, change.revision, None)
                        last = (0, False)
                    else:
                        snapshot = StateSnapshot(run_id, change.revision,
                                                 self._decode(change.value, key),
                                                 len(change.value), change.lease)
                        last = (change.revision, True)
                    yield snapshot
                    continue
                snapshot = self._from_read(run_id, key, change)
                seen = (snapshot.revision, True) if snapshot.state is not None else (0, False)
                if seen != last:
                    last = seen
                    yield snapshot

    def _from_read(self, run_id: str, key: bytes, response: Any) -> StateSnapshot:
        if not response.kvs:
            return StateSnapshot(run_id, int(response.header.revision), None)
        kv = response.kvs[0]
        return StateSnapshot(run_id, int(kv.mod_revision), self._decode(bytes(kv.value), key),
                             len(kv.value), int(kv.lease))

    async def watch_native(self, run_id: str) -> AsyncGenerator[NativeEvent, None]:
        """A native run, then every change of it, until the caller stops iterating.

        First a ``status`` event (the run as read now, its nodes listed with their ranks),
        then one event per change a person acts on: a node joined or left a round, a round
        was sealed, nodes wait for the next round, the run was closed. Each carries the
        run's figures after it. It resumes after etcd's failures as :meth:`watch_state`
        does; after a compaction, it starts again with a ``status`` event.

        Raises:
            EtcdAuthError: the credentials or permissions were refused; at once.
            EtcdConnectionError: another permanent error (not a
                :class:`~etcd_rdzv.errors.TransientError`); at once.
        """
        keys = RunKeys(run_id, self._prefix)
        prefix = keys.native_prefix
        native = _NativeKeys(keys)
        async with aclosing(self._follow(prefix, utils.prefix_range_end(prefix), None)) \
                as changes:
            async for change in changes:
                if not isinstance(change, WatchEvent):
                    native = _NativeKeys.load(keys, change.kvs)
                    await self._read_roster(native, keys)
                    revision = int(change.header.revision)
                    yield NativeEvent(run_id, revision, "status",
                                      native.view(run_id, revision, with_nodes=True))
                    continue
                told = native.apply(change.key, change.value, change.lease,
                                    change.create_revision)
                if told is not None:
                    what, round_, name = told
                    yield NativeEvent(run_id, change.revision, what,
                                      native.view(run_id, change.revision), round_,
                                      None if name is None else _node_fields(name)["node"])

    async def watch_run(self, run_id: str) -> AsyncGenerator[StateSnapshot | NativeEvent, None]:
        """The run, whichever handler drives it, then every change, until the caller stops
        iterating: :meth:`watch_state`'s snapshots for a torch run, :meth:`watch_native`'s
        events for a native one. A run that has neither yet yields an empty snapshot, then
        follows whichever handler's key appears first.

        Raises:
            as :meth:`watch_state` and :meth:`watch_native`.
        """
        handler, revision = await self._handler_at(run_id)
        start_revision: int | None = None
        if handler is None:
            yield StateSnapshot(run_id, revision, None)
            handler, start_revision = await self._first_key(run_id, revision + 1)
        if handler == "torch":
            async with aclosing(self.watch_state(run_id, start_revision=start_revision)) \
                    as snapshots:
                async for snapshot in snapshots:
                    yield snapshot
        else:
            async with aclosing(self.watch_native(run_id)) as events:
                async for event in events:
                    yield event

    async def _first_key(self, run_id: str, start_revision: int) -> tuple[Handler, int]:
        """Wait for the run's state or first native key; the handler and its revision."""
        keys = RunKeys(run_id, self._prefix)
        # The state key and every key under the run's prefix, plus other runs' keys that
        # sort between them (skipped).
        end = utils.prefix_range_end(keys.run_prefix)
        async with aclosing(self._follow(keys.state, end, start_revision)) as changes:
            async for change in changes:
                if not isinstance(change, WatchEvent):
                    # Read afresh after a compaction: it may be there already.
                    handler, revision = await self._handler_at(run_id)
                    if handler is not None:
                        return handler, revision
                    continue
                if change.value is not None:
                    kind = parse_run_key(self._prefix, change.key)
                    if kind == (run_id, "state"):
                        return "torch", change.revision
                    if kind == (run_id, "native"):
                        return "native", change.revision
        raise AssertionError("a watch ends only when its caller stops it")

    async def close_run(self, run_id: str) -> bool:
        """Close the rendezvous, as torch's ``set_closed()`` does: the state with
        ``closed=True``, written by compare-and-swap.

        Agents see it on their next read of the state: ``is_closed()`` turns True; a node
        that joins or re-joins (after a failure or a membership change) gets
        ``RendezvousClosedError``, and a node in the redundancy list exits gracefully, instead
        of waiting for a new round. Workers that are running are not interrupted. It is what
        torch's agents do themselves when a job ends. A write that loses to an agent's (a
        heartbeat) is tried again on the state that won, until ``read_timeout``.

        A native run (``handler=native``) is closed as its nodes close it
        (:func:`~etcd_rdzv.native.close_native_run`): its ``closed`` key, on the run lease.
        Waiting nodes get ``RendezvousClosedError`` at once (they watch it), standbys exit
        gracefully, members see ``is_closed()`` turn true.

        Returns:
            True when this call closed it; False when it was closed already.

        Raises:
            RunNotFoundError: the run has neither a state nor native keys.
            EtcdStateError: the state cannot be decoded, or is not a plain torch state.
            EtcdConnectionError: etcd did not answer, or other writers kept winning, within
                ``read_timeout``.
        """
        backend = AsyncEtcdRendezvousBackend(
            self._client, run_id, key_prefix=self._prefix, ttl=self._ttl, codec=self._codec)
        deadline = self._deadline()
        current = await backend.get_state()
        if current is None and await self.handler(run_id) == "native":
            return await self._close_native(RunKeys(run_id, self._prefix), deadline)
        conflicts = 0
        while True:
            if current is None:
                raise RunNotFoundError(f"The run {run_id!r} has no rendezvous state and no "
                                       f"native keys under {self._prefix!r}; nothing to close.")
            state, token = current
            if decode_state(state, key=backend.key).closed:
                return False
            result = await backend.set_state(encode_closed(state, key=backend.key), token)
            if result is None:
                current = None
                continue
            if result[2]:
                return True
            conflicts += 1
            if deadline.expired:
                raise EtcdConnectionError(
                    f"Closing the run {run_id!r} lost to other writers {conflicts} times "
                    f"within {deadline.seconds:g} s (read_timeout); it is not closed yet."
                )
            current = result[0], result[1]
            await asyncio.sleep(random.uniform(0, 0.02))

    async def _close_native(self, keys: RunKeys, deadline: Deadline) -> bool:
        if (await self._client.get(keys.closed, deadline)).kvs:
            return False
        await close_native_run(self._client, keys, deadline, ttl=self._ttl)
        return True

    async def delete_run(self, run_id: str, *, unchanged_since: int | None = None) -> int | None:
        """Delete every key of the run (state, store, native), in one transaction.

        Args:
            run_id: the run.
            unchanged_since: delete only if no key of the run was written after this
                revision (e.g. :attr:`RunInfo.last_revision` from a listing), so a run that
                came back to life meanwhile is kept.

        Returns:
            How many keys were deleted (0: there were none); None when the run changed
            after ``unchanged_since`` and nothing was deleted.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        keys = RunKeys(run_id, self._prefix)
        key, owned = keys.state, keys.run_prefix
        owned_end = utils.prefix_range_end(owned)
        compare = []
        if unchanged_since is not None:
            compare = [
                rpc.Compare(key=key, result=rpc.Compare.LESS, target=rpc.Compare.MOD,
                            mod_revision=unchanged_since + 1),
                rpc.Compare(key=owned, range_end=owned_end, result=rpc.Compare.LESS,
                            target=rpc.Compare.MOD, mod_revision=unchanged_since + 1),
            ]
        request = rpc.TxnRequest(compare=compare, success=[
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key)),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=owned,
                                                                      range_end=owned_end)),
        ])
        response = await self._client.txn_idempotent(
            request, self._deadline(), f"Deleting the run {key.decode(errors='replace')!r}")
        if not response.succeeded:
            return None
        return sum(int(op.response_delete_range.deleted) for op in response.responses)
