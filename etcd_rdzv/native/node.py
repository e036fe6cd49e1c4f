"""One node of a native rendezvous: the executor of :func:`~.decide.decide`'s steps.

:class:`AsyncNativeRendezvous` owns the node's effects and nothing else: its
:class:`~.session.NodeSession` (lease and keep-alive), its share of the run's
:class:`~.control.ControlFeed`, and the etcd I/O of each step. Its loop builds a
:class:`~.decide.NodeView`, asks :func:`~.decide.decide` for the next step, does it, and
records what etcd said in the view. Errors are sorted once, in :meth:`_run`: a transient
one (:class:`~etcd_rdzv.errors.TransientError`) is recorded as etcd's silence and the rules
decide when to look again; a lease etcd no longer has is a lost lease (the node joins
again); anything else ends the rendezvous.

**What one node costs per round**, whatever the number of nodes N: writes: one join Txn (it
also leaves the previous round), at most one seal attempt, a waiting marker if it waits;
reads: a count after joining and one per wake-up (a ``ctl/`` event, or a tick of
``keep_alive_interval`` while it waits for a round to fill), one rank read; events: the
seal of its round and a few ``ctl/`` changes. The one exception is the sealer of a round
more than ``max_nodes`` joined: it reads the first ``max_nodes`` keys to find the cutoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import replace

from aetcd import rpc, utils

from .._connection import EtcdClient
from ..cas import Expect, compare_and_swap
from ..deadline import Deadline
from ..errors import (
    CompactedError,
    EtcdConnectionError,
    EtcdRendezvousError,
    JoinTimeoutError,
    LeaseNotFoundError,
    RunClosedError,
    StandbyExitError,
    TransientError,
)
from ..keys import RunKeys
from .control import ControlFeed
from .decide import (
    Admitted,
    Closed,
    Count,
    Counts,
    Failed,
    Join,
    MarkWaiting,
    NodeView,
    ReadRank,
    SealRound,
    Step,
    TimedOut,
    Wait,
    decide,
)
from .model import Admission, NativeSettings, NodeId, Seal
from .run import close_native_run, torch_run_error
from .session import NodeSession, RunLease

__all__ = ["AsyncNativeRendezvous"]

log = logging.getLogger(__name__)


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
        self._feed = ControlFeed.detached(keys)
        self._session = NodeSession(client, settings, self._node, keys.run_id,
                                    run_lease=lambda: self._feed.view.run_lease,
                                    wake=lambda: self._feed.wake())
        #: Taken by the first node that writes a shared key (a seal, the close), not at
        #: start: N nodes starting at once would each grant one.
        self._run_lease = RunLease(client, keys, settings.ttl)
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._member_key: bytes | None = None
        self._admission: Admission | None = None
        self._last_waiting = 0

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

    async def start(self) -> None:
        """Take this node's lease, follow ``ctl/`` and start the keep-alive loop.

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
            self._feed = await ControlFeed.attach(self._client, self._keys, deadline)
            try:
                await self._session.open(deadline)
            except BaseException:
                await self._feed.detach()
                raise
            self._started = True

    # --- the rendezvous: the executor ------------------------------------------------------

    async def next_rendezvous(self) -> Admission:
        """Join the next round and return this node's rank in it once it is sealed.

        Raises:
            RunClosedError: the run is closed (:class:`StandbyExitError` for a node that
                stood by beyond ``max_nodes``: it may exit cleanly).
            JoinTimeoutError: no round admitted this node within ``join_timeout``.
            HandlerMismatchError: the run is driven by torch's handler.
            EtcdConnectionError: etcd refused the node for good (permissions, TLS), or did
                not answer within ``read_timeout`` when it started.
        """
        await self.start()
        self._admission = None
        now = time.monotonic()
        view = NodeView(self._settings, now, now, self._feed.view.snapshot())
        while True:
            changed = self._feed.changed
            view = self._observe(view)
            step = decide(view)
            log.debug("node %s: %s (%s)", self._node, step, step.rule.value)
            if isinstance(step, Admitted):
                self._admission = step.admission
                return step.admission
            if isinstance(step, Closed | TimedOut | Failed):
                await self._leave_round()
                raise self._give_up(step)
            if isinstance(step, Wait):
                if await self._wait(changed, step.until):
                    view = replace(view, changed_at=time.monotonic())
                continue
            view = await self._run(step, view)

    def _observe(self, view: NodeView) -> NodeView:
        """The view with what the node's own objects know now."""
        return replace(view, now=time.monotonic(), control=self._feed.view.snapshot(),
                       lease=self._session.lease,
                       failure=view.failure or self._feed.failure or self._session.failure)

    async def _wait(self, changed: asyncio.Event, until: float) -> bool:
        """Until ``until`` or a ``ctl/`` change; True on a change."""
        waiter = asyncio.ensure_future(changed.wait())
        try:
            timeout = None if until == math.inf else max(0.0, until - time.monotonic())
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        return changed.is_set()

    def _give_up(self, step: Closed | TimedOut | Failed) -> EtcdRendezvousError:
        run_id, settings = self._keys.run_id, self._settings
        if isinstance(step, Failed):
            return step.error
        if isinstance(step, TimedOut):
            return JoinTimeoutError(
                f"The node {self._node} was not admitted to a round of the rendezvous "
                f"{run_id!r} within join_timeout={settings.join_timeout:g} s."
                + (f" etcd did not answer: {step.unreachable}" if step.unreachable else ""))
        if step.standby:
            return StandbyExitError(f"The rendezvous {run_id!r} is closed, terminating "
                                    "pending rendezvous.")
        return RunClosedError(f"The rendezvous {run_id!r} is closed.")

    async def _run(self, step: Step, view: NodeView) -> NodeView:
        """Do ``step``'s I/O; the view after it. Sorts every etcd error (see the module)."""
        try:
            if isinstance(step, Join):
                return await self._join(step.round, view)
            if isinstance(step, Count):
                return view.after_count(await self._counts(step.round))
            if isinstance(step, MarkWaiting):
                await self._mark_waiting(step)
                return view.after_mark()
            if isinstance(step, SealRound):
                return await self._seal(step.round, view)
            if isinstance(step, ReadRank):
                return view.after_rank(await self._rank(step.seal))
        except TransientError as exc:
            if view.unreachable is None:
                log.warning("etcd is unreachable; node %s keeps waiting for a round of %r "
                            "(%s)", self._node, self._keys.run_id, exc)
            return view.after_silence(str(exc))
        except LeaseNotFoundError as exc:  # the run lease, lost twice in one call
            return view.after_silence(str(exc))
        except EtcdRendezvousError as exc:
            return view.after_failure(exc)
        raise AssertionError(f"not a step with I/O: {step}")

    # --- the steps' etcd I/O -------------------------------------------------------------------

    def _count_ops(self, round_: int) -> list[rpc.RequestOp]:
        """Count the join keys of ``round_`` and of the round before it."""
        return [rpc.RequestOp(request_range=rpc.RangeRequest(
                    key=prefix, range_end=utils.prefix_range_end(prefix), count_only=True))
                for prefix in (self._keys.round_prefix(round_),
                               self._keys.round_prefix(round_ - 1))]

    @staticmethod
    def _read_counts(response: rpc.TxnResponse, read_at: float) -> Counts:
        joined, previous = response.responses[-2:]
        return Counts(int(joined.response_range.count), int(previous.response_range.count),
                      read_at)

    async def _join(self, round_: int, view: NodeView) -> NodeView:
        """Move this node's key into ``round_``: one Txn, which also leaves its old key and
        counts the round and the previous one. Safe to resend: it puts the same key."""
        deadline = self._deadline()
        lease = self._session.lease or await self._session.new_lease(deadline)
        key = self._keys.member(round_, self._node.name)
        # etcd refuses a Txn that deletes and puts one key; the put replaces it anyway.
        leave = [] if self._member_key in (None, key) else [
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._member_key))]
        read_at = time.monotonic()
        value = json.dumps({"joined_at": time.time()}).encode()
        try:
            response = await self._client.txn_idempotent(rpc.TxnRequest(
                # Guarded by the absence of torch's state: one run, one protocol.
                compare=[Expect.absent().compare(self._keys.state)],
                success=[*leave, rpc.RequestOp(request_put=rpc.PutRequest(
                    key=key, value=value, lease=lease)), *self._count_ops(round_)],
            ), deadline, f"Joining round {round_} of {self._keys.run_id!r}")
        except LeaseNotFoundError:
            self._session.lost(lease)  # the rules join again, with a new lease
            return view
        if not response.succeeded:
            raise torch_run_error(self._keys)
        self._member_key = key
        return view.after_join(round_, lease, self._read_counts(response, read_at))

    async def _counts(self, round_: int) -> Counts:
        read_at = time.monotonic()
        response = await self._client.txn_idempotent(
            rpc.TxnRequest(success=self._count_ops(round_)), self._deadline(),
            f"Counting the nodes of round {round_}")
        return self._read_counts(response, read_at)

    async def _mark_waiting(self, step: MarkWaiting) -> None:
        marker = self._keys.waiting(step.round)
        assert step.lease, "a waiting marker must go when its node does"
        # Create-only: N waiters racing make one marker, one ctl/ event.
        try:
            await self._client.txn_idempotent(rpc.TxnRequest(
                compare=[Expect.absent().compare(marker)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=marker, value=self._node.name, lease=step.lease))],
            ), self._deadline(), f"Marking round {step.round} as awaited")
        except LeaseNotFoundError:
            self._session.lost(step.lease)  # its key went with it: the rules join again

    async def _rank(self, seal: Seal) -> Admission | None:
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
        return Admission(seal.round, before, seal.size) if mine else None

    async def _seal(self, round_: int, view: NodeView) -> NodeView:
        """Count ``round_`` again and seal it if enough nodes joined; the view after."""
        settings, prefix = self._settings, self._keys.round_prefix(round_)
        deadline = self._deadline()
        read_at = time.monotonic()
        response = await self._client.txn_idempotent(
            rpc.TxnRequest(success=self._count_ops(round_)), deadline,
            f"Counting round {round_}")
        counts = self._read_counts(response, read_at)
        after = view.after_count(counts)
        if counts.joined < settings.min_nodes or after.previous_trains:
            return after  # fewer nodes now, or members came back: the rules decide again
        cutoff, size = int(response.header.revision), counts.joined
        if size > settings.max_nodes:
            cutoff, size = await self._cap(prefix, cutoff, deadline)
        seal = Seal(round_, cutoff, size, time.time(), str(self._node))
        self._run_lease.lease_id = self._run_lease.lease_id or self._feed.view.run_lease
        result = await compare_and_swap(
            self._client, self._keys.seal(round_), Expect.absent(), seal.encode(), deadline,
            f"Sealing round {round_} of {self._keys.run_id!r}", lease=self._run_lease,
            tagged=True,
        )
        if not result.applied:
            # Another node sealed it: take its seal now rather than wait for the watch.
            return after.after_seal(Seal.decode(result.value)) if result.value else after
        log.info("node %s sealed round %d of %r with %d nodes", self._node, round_,
                 self._keys.run_id, size)
        # Cleanup only: a node still in an old round holds its own key.
        with contextlib.suppress(TransientError):
            await self._client.delete(self._keys.seal(round_ - 2), deadline)
            await self._client.delete(self._keys.waiting(round_), deadline)
        return after.after_seal(seal)

    async def _cap(self, prefix: bytes, revision: int, deadline: Deadline) -> tuple[int, int]:
        """The cutoff that admits the first ``max_nodes`` joiners, and the roster's size."""
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

    async def _leave_round(self) -> None:
        if self._member_key is not None:
            with contextlib.suppress(EtcdConnectionError):
                await self._client.delete(self._member_key, self._deadline())
            self._member_key = None

    # --- what the agent asks between rounds --------------------------------------------------

    async def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round (0 when none may be admitted).

        Reads etcd only while some node waits; when etcd does not answer, returns the last
        value it knew, with a warning, rather than failing the agent.

        Raises:
            EtcdConnectionError: etcd refused the read for good (permissions, TLS).
        """
        if self._admission is None:
            return 0
        next_round = self._admission.round + 1
        if next_round not in self._feed.view.waiting:
            self._last_waiting = 0
            return 0
        prefix = self._keys.round_prefix(next_round)
        try:
            self._last_waiting = int((await self._client.range(rpc.RangeRequest(
                key=prefix, range_end=utils.prefix_range_end(prefix), count_only=True),
                self._deadline(), f"Counting the nodes waiting for round {next_round}")).count)
        except TransientError as exc:
            log.warning("etcd is unreachable; num_nodes_waiting answers its last value, %d "
                        "(%s)", self._last_waiting, exc)
        return self._last_waiting

    async def is_closed(self) -> bool:
        """Whether the run is closed; from the watched view when etcd does not answer."""
        try:
            return bool((await self._client.get(self._keys.closed, self._deadline())).kvs)
        except TransientError as exc:
            log.warning("etcd is unreachable; is_closed answers from its last view (%s)", exc)
            return self._feed.view.closed

    async def set_closed(self) -> None:
        """Close the run: nodes waiting for a round get :class:`RunClosedError`."""
        await self.start()
        await close_native_run(self._client, self._keys,
                               Deadline.after(self._settings.close_timeout),
                               ttl=self._settings.ttl, closed_by=self._node.name)

    async def leave(self) -> None:
        """Leave the run now, without closing it: revoking this node's lease deletes its
        keys at once, so the others see the departure immediately."""
        started, self._started = self._started, False
        self._member_key, self._admission = None, None
        try:
            await self._session.close(self._deadline())
        finally:
            if started:
                await self._feed.detach()

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
