"""The etcd requests of a round, as :mod:`etcd_rdzv.native.rounds` sends them, applied to
the :class:`~.etcd.EtcdModel`: one function per request, no decisions, no faults (the node
model decides whether a call reaches etcd and whether its answer comes back).

Each mirrors its original line for line: the join Txn (delete every key the node may hold
but the new one, put the new key under the lease, and count, in one revision), the counts
(the round's join keys and the previous round's, whether the node's own key is there under
its lease, whether the run is closed) and their revision, the create-only waiting marker,
the rank read at the seal's cutoff, the cap to the first ``max_nodes`` joiners, the
create-only seal and the two cleanup deletes that follow it.
"""

from __future__ import annotations

from collections.abc import Iterable

from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native.decide import Counts
from etcd_rdzv.native.model import Admission, Seal

from .etcd import EtcdModel, prefix_end

__all__ = ["cap", "count", "delete", "join", "mark_waiting", "rank", "seal"]


def _counts(etcd: EtcdModel, keys: RunKeys, round_: int, key: bytes, lease: int,
            read_at: float) -> Counts:
    """``_count_ops`` and ``_counts_of``: the join keys of ``round_`` and of the round before
    it, whether ``key`` is there under ``lease``, whether the run is closed."""
    return Counts(_count(etcd, keys.round_prefix(round_)),
                  _count(etcd, keys.round_prefix(round_ - 1)), read_at,
                  mine=etcd.get(key) is not None and etcd.lease_of(key) == lease,
                  closed=etcd.get(keys.closed) is not None)


def count(etcd: EtcdModel, keys: RunKeys, round_: int, name: bytes, lease: int,
          read_at: float) -> tuple[Counts, int]:
    """The counts of ``round_`` and the previous one (and whether the node's key is there
    under ``lease``, whether the run is closed), and the revision they were read at.
    ``read_at``: when the node sent the read."""
    return _counts(etcd, keys, round_, keys.member(round_, name), lease, read_at), etcd.revision


def join(etcd: EtcdModel, keys: RunKeys, round_: int, name: bytes, lease: int,
         held: Iterable[bytes], read_at: float) -> Counts:
    """Put the node's key in ``round_`` under ``lease``, delete the other keys it may hold
    (``held``), and count.

    Raises:
        LeaseGoneError: etcd no longer has ``lease``.
    """
    key = keys.member(round_, name)
    leave = sorted(set(held) - {key})
    etcd.write(deletes=leave, puts=[(key, b'{"joined_at": 0}', lease)])
    return _counts(etcd, keys, round_, key, lease, read_at)


def mark_waiting(etcd: EtcdModel, keys: RunKeys, round_: int, name: bytes, lease: int) -> None:
    """Create ``ctl/wait/<round_>`` under ``lease`` unless it exists. Unlike the original,
    lease 0 is written (a marker that never expires), so a rule that asks for it shows.

    Raises:
        LeaseGoneError: etcd no longer has ``lease`` (and the marker did not exist).
    """
    etcd.create(keys.waiting(round_), name, lease)


def rank(etcd: EtcdModel, keys: RunKeys, seal_: Seal, key: bytes) -> Admission | None:
    """The node's rank in the roster of ``seal_``'s round, read at its cutoff; None when the
    roster left it out."""
    prefix = keys.round_prefix(seal_.round)
    mine = etcd.count(key, key + b"\0", seal_.cutoff, seal_.cutoff)
    before = etcd.count(prefix, key, seal_.cutoff, seal_.cutoff)
    return Admission(seal_.round, before, seal_.size) if mine else None


def cap(etcd: EtcdModel, keys: RunKeys, round_: int, revision: int,
        limit: int) -> tuple[int, int]:
    """The cutoff that admits the first ``limit`` joiners, and the roster's size. Its reads
    are at past revisions, which never change: one call stands for the original's several."""
    prefix = keys.round_prefix(round_)
    while True:
        first = sorted(etcd.keys_in(prefix, prefix_end(prefix), revision),
                       key=lambda kv: kv[1])[:limit]
        cutoff = first[-1][1]
        size = etcd.count(prefix, prefix_end(prefix), cutoff, cutoff)
        if size <= limit:
            return cutoff, size
        revision = cutoff  # keys deleted after the cutoff still count there: go earlier


def seal(etcd: EtcdModel, keys: RunKeys, seal_: Seal, run_lease: int) -> Seal | None:
    """Create ``ctl/seal/<round>`` under the run lease: None when this one was written,
    else the seal that holds."""
    held = etcd.create(keys.seal(seal_.round), seal_.encode(), run_lease)
    return None if held is None else Seal.decode(held)


def delete(etcd: EtcdModel, key: bytes) -> None:
    etcd.write(deletes=[key])


def _count(etcd: EtcdModel, prefix: bytes) -> int:
    return etcd.count(prefix, prefix_end(prefix))
