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
import logging
import math
import time
from dataclasses import replace

from aetcd import rpc, utils

from .._connection import EtcdClient
from ..deadline import Deadline
from ..errors import (
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
from .rounds import RoundRequests
from .run import close_native_run
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
        # The run lease is taken by the first node that writes a shared key (a seal, the
        # close), not at start: N nodes starting at once would each grant one.
        self._requests = RoundRequests(client, keys, settings, self._node,
                                       RunLease(client, keys, settings.ttl))
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        #: The join keys this node may hold: its last, and any a join whose answer was lost
        #: may have put. The next join deletes them all but its own.
        self._held_keys: set[bytes] = set()
        self._admission: Admission | None = None
        #: The seal and the lease of the node's last admission: a new rendezvous starts
        #: after that round even before the watch shows its seal, and a lost lease or a
        #: later seal tells the agent to restart (num_nodes_waiting).
        self._admitted: tuple[Seal, int] | None = None
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
        view = NodeView(self._settings, now, now, self._feed.view.snapshot(),
                        learned_seal=self._admitted[0] if self._admitted else None)
        while True:
            changed = self._feed.changed
            view = self._observe(view)
            step = decide(view)
            log.debug("node %s: %s (%s)", self._node, step, step.rule.value)
            if isinstance(step, Admitted):
                seal = view.seal_of(step.admission.round)
                assert seal is not None
                self._admission, self._admitted = step.admission, (seal, view.key_lease)
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
        requests = self._requests
        try:
            if isinstance(step, Join):
                lease = self._session.lease or await self._session.new_lease(self._deadline())
                key = self._keys.member(step.round, self._node.name)
                try:
                    counts = await requests.join(step.round, lease, self._held_keys)
                except LeaseNotFoundError:
                    self._session.lost(lease)  # the rules join again, with a new lease
                    return view
                except TransientError as exc:  # it may have landed: the rules check
                    self._held_keys.add(key)
                    return view.after_join(step.round, lease, None, str(exc))
                self._held_keys = {key}
                return view.after_join(step.round, lease, counts)
            if isinstance(step, Count):
                return view.after_count((await requests.count(step.round, view.key_lease))[0])
            if isinstance(step, MarkWaiting):
                try:
                    await requests.mark_waiting(step.round, step.lease)
                except LeaseNotFoundError:
                    self._session.lost(step.lease)  # its key went with it: join again
                    return view
                return view.after_mark()
            if isinstance(step, SealRound):
                return await self._seal(step.round, view)
            if isinstance(step, ReadRank):
                key = self._keys.member(view.round, self._node.name)
                return view.after_rank(await requests.rank(step.seal, key))
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

    async def _seal(self, round_: int, view: NodeView) -> NodeView:
        """Count ``round_`` again and, if the rules still say so, seal it."""
        counts, revision = await self._requests.count(round_, view.key_lease)
        counted = replace(view, now=time.monotonic()).after_count(counts)
        if counted.closed_seen or counted.now < counted.seal_due:
            # Closed, fewer nodes now, or members came back: the rules decide again. (A
            # close between this read and the seal is a close after the seal.)
            return counted
        try:
            seal = await self._requests.seal(round_, counts, revision, self._feed.view.run_lease)
        except ValueError as exc:  # another program wrote the key: the round is taken
            return counted.after_silence(f"{self._keys.seal(round_)!r}: {exc}")
        if seal.sealer == str(self._node):
            log.info("node %s sealed round %d of %r with %d nodes", self._node, round_,
                     self._keys.run_id, seal.size)
        return counted.after_seal(seal)

    async def _leave_round(self) -> None:
        held, self._held_keys = self._held_keys, set()
        for key in sorted(held):
            with contextlib.suppress(EtcdConnectionError):
                await self._client.delete(key, self._deadline())

    # --- what the agent asks between rounds --------------------------------------------------

    async def num_nodes_waiting(self) -> int:
        """How many nodes wait for the next round (0 when none may be admitted).

        Reads etcd only while some node waits; when etcd does not answer, returns the last
        value it knew, with a warning, rather than failing the agent.

        Raises:
            EtcdConnectionError: etcd refused the read for good (permissions, TLS).
        """
        if self._admission is None or self._admitted is None:
            return 0
        seal, lease = self._admitted
        if self._session.lease != lease or self._feed.view.latest_round > seal.round:
            # The node is out of its round (its lease, and so its key, expired; or a later
            # round formed without it): its agent must restart it, as for a waiting node.
            return max(1, self._last_waiting)
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
        self._held_keys, self._admission, self._admitted = set(), None, None
        try:
            await self._session.close(self._deadline())
        finally:
            if started:
                await self._feed.detach()

    async def shutdown(self) -> bool:
        """torch's ``shutdown``: close the run for everyone, then leave it.

        Returns False (with a warning) when etcd did not answer, or refused the close.
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
