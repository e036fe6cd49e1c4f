"""The etcd requests of a round, one method per protocol step; no decisions.

:class:`RoundRequests` builds and sends what :class:`~.node.AsyncNativeRendezvous` needs to
carry out a step of :func:`~.decide.decide`: the join Txn, the counts, the waiting marker,
the rank read at a seal's cutoff, and the seal. Every call carries a :class:`Deadline` of
``read_timeout``; reads and guarded writes are retried within it (``txn_idempotent``), the
seal goes through :func:`~etcd_rdzv.cas.compare_and_swap`, which resolves a lost answer by
reading. Errors are :mod:`etcd_rdzv.errors`' own; the node sorts them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable

from aetcd import rpc, utils

from .._connection import EtcdClient
from ..cas import Expect, compare_and_swap
from ..deadline import Deadline
from ..errors import CompactedError, TransientError
from ..keys import RunKeys
from .decide import Counts
from .model import Admission, NativeSettings, NodeId, Seal
from .run import torch_run_error
from .session import RunLease

__all__ = ["RoundRequests"]


class RoundRequests:
    """The requests of one node's steps in one run."""

    def __init__(self, client: EtcdClient, keys: RunKeys, settings: NativeSettings,
                 node: NodeId, run_lease: RunLease) -> None:
        self._client = client
        self._keys = keys
        self._settings = settings
        self._node = node
        self._run_lease = run_lease

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    def _count_ops(self, round_: int, key: bytes) -> list[rpc.RequestOp]:
        """Count the join keys of ``round_`` and of the round before it, read the node's own
        key ``key`` (is it there, under which lease) and whether the run is closed."""
        counts = [rpc.RequestOp(request_range=rpc.RangeRequest(
                      key=prefix, range_end=utils.prefix_range_end(prefix), count_only=True))
                  for prefix in (self._keys.round_prefix(round_),
                                 self._keys.round_prefix(round_ - 1))]
        return [*counts,
                rpc.RequestOp(request_range=rpc.RangeRequest(key=key, keys_only=True)),
                rpc.RequestOp(request_range=rpc.RangeRequest(key=self._keys.closed,
                                                             count_only=True))]

    @staticmethod
    def _counts_of(response: rpc.TxnResponse, read_at: float, lease: int) -> Counts:
        joined, previous, mine, closed = (op.response_range for op in response.responses[-4:])
        return Counts(int(joined.count), int(previous.count), read_at,
                      mine=any(int(kv.lease) == lease for kv in mine.kvs),
                      closed=bool(closed.count))

    async def join(self, round_: int, lease: int, held: Iterable[bytes]) -> Counts:
        """Put this node's key in ``round_`` under ``lease``, delete the other keys it may
        hold (``held``: its previous key, and any a join whose answer was lost may have
        put), and count: one Txn, safe to resend (it puts the same key).

        Raises:
            HandlerMismatchError: torch's handler drives the run.
            LeaseNotFoundError: etcd no longer has ``lease``.
        """
        key = self._keys.member(round_, self._node.name)
        # etcd refuses a Txn that deletes and puts one key; the put replaces it anyway.
        leave = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=old))
                 for old in sorted(set(held) - {key})]
        read_at = time.monotonic()
        value = json.dumps({"joined_at": time.time()}).encode()
        response = await self._client.txn_idempotent(rpc.TxnRequest(
            # Guarded by the absence of torch's state: one run, one protocol.
            compare=[Expect.absent().compare(self._keys.state)],
            success=[*leave, rpc.RequestOp(request_put=rpc.PutRequest(
                key=key, value=value, lease=lease)), *self._count_ops(round_, key)],
        ), self._deadline(), f"Joining round {round_} of {self._keys.run_id!r}")
        if not response.succeeded:
            raise torch_run_error(self._keys)
        return self._counts_of(response, read_at, lease)

    async def count(self, round_: int, lease: int) -> tuple[Counts, int]:
        """The counts of ``round_`` and the previous one (and whether this node's key is
        there under ``lease``, whether the run is closed), and the revision they were read
        at: one read."""
        read_at = time.monotonic()
        key = self._keys.member(round_, self._node.name)
        response = await self._client.txn_idempotent(
            rpc.TxnRequest(success=self._count_ops(round_, key)), self._deadline(),
            f"Counting the nodes of round {round_}")
        return self._counts_of(response, read_at, lease), int(response.header.revision)

    async def mark_waiting(self, round_: int, lease: int) -> None:
        """Create ``ctl/wait/<round_>`` under ``lease`` unless it exists.

        Raises:
            LeaseNotFoundError: etcd no longer has ``lease``.
        """
        assert lease, "a waiting marker must go when its node does"
        marker = self._keys.waiting(round_)
        # Create-only: N waiters racing make one marker, one ctl/ event.
        await self._client.txn_idempotent(rpc.TxnRequest(
            compare=[Expect.absent().compare(marker)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(
                key=marker, value=self._node.name, lease=lease))],
        ), self._deadline(), f"Marking round {round_} as awaited")

    async def rank(self, seal: Seal, key: bytes) -> Admission | None:
        """The rank of the node whose join key is ``key`` in the sealed round, or None when
        the roster left it out (it joined after the cutoff, or lost its key before it).

        Raises:
            CompactedError: etcd compacted the cutoff revision (the message says how not to).
        """
        prefix = self._keys.round_prefix(seal.round)
        at_cutoff = {"revision": seal.cutoff, "max_create_revision": seal.cutoff,
                     "count_only": True}
        try:
            response = await self._client.txn_idempotent(rpc.TxnRequest(success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(key=key, **at_cutoff)),
                rpc.RequestOp(request_range=rpc.RangeRequest(key=prefix, range_end=key,
                                                             **at_cutoff)),
            ]), self._deadline(), f"Reading this node's rank in round {seal.round}")
        except CompactedError as exc:
            raise CompactedError(
                f"Round {seal.round} of {self._keys.run_id!r} was sealed at revision "
                f"{seal.cutoff}, which etcd compacted before this node read its rank: keep "
                "etcd's --auto-compaction-retention above a minute, and compact_interval off "
                f"for torch-handler runs on the same etcd ({exc})", exc.compact_revision,
            ) from exc
        mine, before = (int(op.response_range.count) for op in response.responses)
        return Admission(seal.round, before, seal.size) if mine else None

    async def seal(self, round_: int, counted: Counts, revision: int, run_lease: int) -> Seal:
        """Seal ``round_`` with the nodes ``counted`` at ``revision`` (the first
        ``max_nodes`` of them when more joined); the seal that holds: this one, or the one
        of the node that was quicker.

        Raises:
            ValueError: the seal key holds a value that is no seal (another program wrote it).
        """
        deadline = self._deadline()
        cutoff, size = revision, counted.joined
        if size > self._settings.max_nodes:
            cutoff, size = await self._cap(round_, cutoff, deadline)
        seal = Seal(round_, cutoff, size, time.time(), str(self._node))
        self._run_lease.lease_id = self._run_lease.lease_id or run_lease
        result = await compare_and_swap(
            self._client, self._keys.seal(round_), Expect.absent(), seal.encode(), deadline,
            f"Sealing round {round_} of {self._keys.run_id!r}", lease=self._run_lease,
            tagged=True,
        )
        if not result.applied:
            assert result.value is not None  # a create-only write fails on an existing key
            return Seal.decode(result.value)
        # Cleanup only: a node still in an old round holds its own key.
        with contextlib.suppress(TransientError):
            await self._client.delete(self._keys.seal(round_ - 2), deadline)
            await self._client.delete(self._keys.waiting(round_), deadline)
        return seal

    async def _cap(self, round_: int, revision: int, deadline: Deadline) -> tuple[int, int]:
        """The cutoff that admits the first ``max_nodes`` joiners, and the roster's size."""
        prefix = self._keys.round_prefix(round_)
        limit = self._settings.max_nodes
        while True:
            first = await self._client.range(rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix), revision=revision,
                sort_target=rpc.RangeRequest.CREATE, sort_order=rpc.RangeRequest.ASCEND,
                limit=limit, keys_only=True), deadline, "Reading the first joiners")
            cutoff = int(first.kvs[-1].create_revision)
            size = int((await self._client.range(rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix), count_only=True,
                revision=cutoff, max_create_revision=cutoff), deadline,
                "Counting the first joiners")).count)
            if size <= limit:
                return cutoff, size
            revision = cutoff  # keys deleted after the cutoff still count there: go earlier
