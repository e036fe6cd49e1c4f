"""A small model of etcd, as the native rendezvous uses it, on the virtual clock.

What it keeps, as etcd does:

* **One revision counter.** Every write that changes a key takes one revision; the puts and
  deletes of one request share it. A delete of a missing key, or a create-only write whose
  key exists, writes nothing and takes none.
* **MVCC history, never compacted.** Each key keeps its lives (created at, deleted at), so a
  range at a past revision with a ``max_create_revision`` counts what etcd would (the seal's
  cutoff, the rank read). A put on a live key keeps its create revision.
* **Leases.** A lease is granted with a TTL. While its node's keep-alive runs it does not
  expire (the node renews it several times per TTL); once the keep-alive stops, it expires
  a TTL after the last renewal, and the expiry sweep deletes all its keys in one revision
  up to :data:`EXPIRY_SWEEP` later. A keep-alive after the expiry finds it gone. A revoke
  deletes the keys at once.
* **Refusals.** A put under a lease etcd no longer has writes nothing and fails
  (:class:`LeaseGoneError`); a Txn that deletes and puts one key is refused (:class:`RefusedError`).
* **Watches.** Every change of a ``ctl/`` key goes to each watcher in revision order; each
  node delays its own deliveries (the node model).

Left out: compaction, members and leaders (an outage is a node's calls failing), the client's
retries (the node model draws the outcome of a whole call), auth, torch's state key and the
run's store.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .clock import Clock

__all__ = ["EXPIRY_SWEEP", "EtcdModel", "LeaseGoneError", "RefusedError", "Watcher", "prefix_end"]

#: etcd's leader looks for expired leases every 500 ms and revokes them through raft: the
#: keys of an expired lease go within this many seconds of its expiry.
EXPIRY_SWEEP = 0.5

#: Told of each change of a watched key: revision, key, value (None: deleted).
Watcher = Callable[[int, bytes, "bytes | None"], None]


class LeaseGoneError(Exception):
    """etcd no longer has the lease a write named (``LeaseNotFoundError`` to a node)."""


class RefusedError(Exception):
    """etcd refused the request for good (an ``EtcdConnectionError`` that is not
    transient, to a node): a Txn that deletes and puts one key."""


@dataclass
class _Life:
    """One life of a key: from its creation to its deletion."""

    created: int
    deleted: int | None = None

    def alive_at(self, revision: int) -> bool:
        return self.created <= revision and (self.deleted is None or self.deleted > revision)


@dataclass
class _Lease:
    ttl: int
    expires_at: float
    """Virtual seconds; infinity while its node's keep-alive runs."""
    keys: set[bytes] = field(default_factory=set)


class EtcdModel:
    """One etcd: keys with their history, leases, and watchers of a prefix.

    Args:
        clock: the virtual clock (lease expiry).
        watched: the prefix watchers are told about (the run's ``ctl/``).
        rng: draws the expiry sweep's delay.
    """

    def __init__(self, clock: Clock, watched: bytes, rng: random.Random) -> None:
        self.clock = clock
        self.watched = watched
        self.rng = rng
        self.revision = 1
        self._lives: dict[bytes, list[_Life]] = {}
        self._sorted: list[bytes] = []
        """Every key that ever lived, sorted: ranges bisect it."""
        self._values: dict[bytes, bytes] = {}
        self._lease_of: dict[bytes, int] = {}
        self._live_under: dict[bytes, int] = {}
        """Live keys under each key's parent (up to its last ``/``): a count of a round."""
        self._leases: dict[int, _Lease] = {}
        self._next_lease = 0x7E000001
        self._watchers: dict[object, Watcher] = {}

    # --- reads -------------------------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        return self._values.get(key)

    def keys_in(self, start: bytes, end: bytes, revision: int = 0,
                max_create: int = 0) -> list[tuple[bytes, int]]:
        """The keys in ``[start, end)`` at ``revision`` (0: now) created at or before
        ``max_create`` (0: any), with their create revisions, in key order."""
        low = bisect.bisect_left(self._sorted, start)
        high = bisect.bisect_left(self._sorted, end)
        found: list[tuple[bytes, int]] = []
        for key in self._sorted[low:high]:
            lives = self._lives[key]
            if revision:
                life = next((life for life in reversed(lives) if life.alive_at(revision)), None)
            else:
                life = lives[-1] if lives[-1].deleted is None else None
            if life is not None and (not max_create or life.created <= max_create):
                found.append((key, life.created))
        return found

    def count(self, start: bytes, end: bytes, revision: int = 0, max_create: int = 0) -> int:
        if not revision and not max_create and start.endswith(b"/") and \
                end == prefix_end(start):
            return self._live_under.get(start, 0)  # the counts nodes read all the time
        return len(self.keys_in(start, end, revision, max_create))

    def live(self, prefix: bytes) -> list[bytes]:
        """The live keys under ``prefix``, in no particular order (cheap: no history)."""
        return [key for key in self._values if key.startswith(prefix)]

    def items(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """The live keys under ``prefix`` and their values, in key order."""
        return [(key, self._values[key]) for key, _ in self.keys_in(prefix, prefix_end(prefix))]

    # --- writes ------------------------------------------------------------------------------

    def write(self, deletes: Sequence[bytes] = (),
              puts: Sequence[tuple[bytes, bytes, int]] = ()) -> int:
        """One request: delete ``deletes``, then put ``puts`` (key, value, lease; lease 0:
        none), all at one revision; the revision after it.

        Raises:
            LeaseGoneError: a put names a lease etcd does not have (nothing is written).
            RefusedError: a key is both deleted and put (etcd: "duplicate key given in txn
                request").
        """
        if set(deletes) & {key for key, _, _ in puts}:
            raise RefusedError("etcdserver: duplicate key given in txn request")
        for _, _, lease in puts:
            if lease and lease not in self._leases:
                raise LeaseGoneError(f"etcdserver: requested lease not found ({lease:x})")
        revision = self.revision + 1
        changes: list[tuple[bytes, bytes | None]] = []
        for key in deletes:
            if key in self._values:
                self._delete(key, revision)
                changes.append((key, None))
        for key, value, lease in puts:
            self._put(key, value, lease, revision)
            changes.append((key, value))
        if changes:
            self.revision = revision
            for key, change in changes:
                if key.startswith(self.watched):
                    for watcher in list(self._watchers.values()):
                        watcher(revision, key, change)
        return self.revision

    def create(self, key: bytes, value: bytes, lease: int) -> bytes | None:
        """A create-only put (a Txn comparing the key's create revision to 0): None when it
        was written, else the value that holds. The lease is checked only when it writes,
        as etcd checks only the branch a Txn takes.

        Raises:
            LeaseGoneError: as for :meth:`write`.
        """
        held = self._values.get(key)
        if held is not None:
            return held
        self.write(puts=[(key, value, lease)])
        return None

    def _put(self, key: bytes, value: bytes, lease: int, revision: int) -> None:
        lives = self._lives.get(key)
        if lives is None:
            lives = self._lives[key] = []
            bisect.insort(self._sorted, key)
        if key not in self._values:
            lives.append(_Life(revision))
            parent = _parent(key)
            self._live_under[parent] = self._live_under.get(parent, 0) + 1
        self._values[key] = value
        self._detach(key)
        if lease:
            self._leases[lease].keys.add(key)
            self._lease_of[key] = lease

    def _delete(self, key: bytes, revision: int) -> None:
        self._lives[key][-1].deleted = revision
        del self._values[key]
        self._live_under[_parent(key)] -= 1
        self._detach(key)

    def _detach(self, key: bytes) -> None:
        lease = self._lease_of.pop(key, 0)
        if lease in self._leases:
            self._leases[lease].keys.discard(key)

    # --- leases ------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease, which expires ``ttl`` seconds from now unless a keep-alive runs."""
        lease = self._next_lease
        self._next_lease += 0x1F3
        self._leases[lease] = _Lease(ttl, math.inf)
        self.stop_renewing(lease, self.clock.now)
        return lease

    def has(self, lease: int) -> bool:
        return lease in self._leases

    def renewing(self, lease: int) -> bool:
        """A keep-alive of ``lease`` runs from now on; False when etcd no longer has it
        (it expired: the keep-alive is answered TTL 0 once etcd revoked it)."""
        held = self._leases.get(lease)
        if held is None or self.clock.now >= held.expires_at:
            return False
        held.expires_at = math.inf
        return True

    def stop_renewing(self, lease: int, last_renewal: float) -> None:
        """The keep-alive of ``lease`` stopped; it last renewed it at ``last_renewal``."""
        held = self._leases.get(lease)
        if held is None:
            return
        held.expires_at = last_renewal + held.ttl
        self.clock.at(held.expires_at + self.rng.uniform(0, EXPIRY_SWEEP),
                      lambda: self._sweep(lease))

    def _sweep(self, lease: int) -> None:
        held = self._leases.get(lease)
        if held is not None and self.clock.now >= held.expires_at:
            self.revoke(lease)

    def revoke(self, lease: int) -> None:
        """Delete the lease and its keys, in one revision."""
        held = self._leases.pop(lease, None)
        if held is not None:
            self.write(deletes=sorted(held.keys))

    def lease_of(self, key: bytes) -> int:
        """The lease ``key`` lives on (0: none, or no such key)."""
        return self._lease_of.get(key, 0)

    def keys_of(self, lease: int) -> frozenset[bytes]:
        held = self._leases.get(lease)
        return frozenset(held.keys) if held is not None else frozenset()

    # --- watches -----------------------------------------------------------------------------

    def watch(self, owner: object, watcher: Watcher) -> int:
        """Tell ``watcher`` of every later change under the watched prefix; the revision
        it starts after (a read of the prefix at that revision sees the rest)."""
        self._watchers[owner] = watcher
        return self.revision

    def unwatch(self, owner: object) -> None:
        self._watchers.pop(owner, None)


def prefix_end(prefix: bytes) -> bytes:
    """The end of ``prefix``'s range (etcd's prefix range end)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _parent(key: bytes) -> bytes:
    return key[:key.rfind(b"/") + 1]
