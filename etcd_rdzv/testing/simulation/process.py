"""One simulated node's process: its calls to etcd, its session, its watch.

:class:`SimProcess` holds what ``AsyncNativeRendezvous`` delegates (the client, the
:class:`~etcd_rdzv.native.NodeSession`, the :class:`~etcd_rdzv.native.ControlFeed`), on the
virtual clock; :class:`~.node.SimNode` adds the rendezvous and the agent on top.

* **A call** reaches etcd after a random latency and is applied there, even if its node died
  meanwhile; its answer comes back after another one. A refused call is never applied; a
  lost answer was applied. Either way the node hears nothing for up to
  :data:`SILENCE_SECONDS` (the client's retries ran out) and records etcd's silence.
* **The session** renews the node's lease while its keep-alive runs; a stall (or an
  unreachable etcd) stops it, and when it resumes a lease that expired meanwhile is lost:
  the lease turns 0 and a waiting node is woken (``NodeSession.lost``).
* **The watch** hands each ``ctl/`` change to the node's own
  :class:`~etcd_rdzv.native.ControlView` after a random delay, in order; a change a waiting
  node acts on wakes it, as ``ControlFeed.wake`` does.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native.control import ControlChange, ControlView
from etcd_rdzv.native.decide import Count, NodeView, Step, Wait
from etcd_rdzv.native.model import Admission, NativeSettings, NodeId

from .clock import Clock
from .etcd import EtcdModel, LeaseGoneError, RefusedError

__all__ = ["SILENCE_SECONDS", "TRACE_LINES", "SimProcess", "World"]

T = TypeVar("T")

#: How long a call etcd did not answer takes to fail: a refused connection fails at once,
#: a request that timed out after its last retry fails after the soak's request_timeout.
SILENCE_SECONDS = (0.01, 2.0)
#: Steps, calls and changes each node remembers, for the history of a violation.
TRACE_LINES = 120


class World(Protocol):
    """What a node needs from the simulation around it."""

    clock: Clock
    etcd: EtcdModel
    keys: RunKeys
    settings: NativeSettings
    run_lease: int

    def rules(self, view: NodeView) -> Step: ...

    def latency(self) -> float: ...

    def watch_delay(self, lagging: bool) -> float: ...

    def uniform(self, low: float, high: float) -> float: ...

    def emit(self, node: SimProcess, kind: str, **fields: Any) -> None: ...

    def spin(self, node: SimProcess) -> None: ...


class SimProcess:
    """One node's process: calls, session, watch. The hooks at the end are the node's."""

    def __init__(self, world: World, label: str, node_id: NodeId) -> None:
        self.world = world
        self.label = label
        self.id = node_id
        self.name = node_id.name
        self.control = ControlView(world.keys)
        self.alive = True
        self.started = False
        self.lease = 0
        """The session's lease (0: none, or lost)."""
        self.admission: Admission | None = None
        self.training = False
        self.trace: deque[tuple[float, object]] = deque(maxlen=TRACE_LINES)
        self.armed: dict[str, str] = {}
        """Call kind (or ``any``) -> ``refused`` or ``lost``: the next such call's fault."""
        self.unreachable_until = -math.inf
        self.stalled_until = -math.inf
        self.lag_until = -math.inf
        self._epoch = 0
        """Bumped when the node's current work is abandoned (a new rendezvous, a leave, a
        crash): answers and timers of older work are dropped."""
        self._renewing = False
        self._watch_floor = 0.0
        self._cycled = 0
        self._cycle: tuple[str, ...] = ()
        self._skipped: deque[tuple[float, object]] = deque(maxlen=2)


    def note(self, what: object) -> None:
        """Remember ``what`` (a step, a fault, a change); a cycle of counts and waits (every
        interval) is kept as its first and last passes and a count of the steps between."""
        now, kind = self.world.clock.now, _cycle_kind(what)
        if kind and kind in self._cycle and len(self._cycle) == 2:
            self._skipped.append((now, what))
            self._cycled += 1
            return
        if self._cycled:
            hidden = self._cycled - len(self._skipped)
            if hidden:
                self.trace.append((self._skipped[0][0], f"({hidden} more steps of that cycle)"))
            self.trace.extend(self._skipped)
            self._skipped.clear()
            self._cycled = 0
        self._cycle = (*self._cycle[-1:], kind) if kind else ()
        self.trace.append((now, what))

    # --- calls -----------------------------------------------------------------------------

    def _later(self, delay: float, callback: Callable[[], None], epoch: int | None = None) -> None:
        """``callback`` after ``delay``, unless the node died or moved on meanwhile."""
        epoch = self._epoch if epoch is None else epoch

        def run() -> None:
            if self.alive and self._epoch == epoch:
                callback()

        self.world.clock.after(delay, run)

    def _fault(self, kind: str) -> str | None:
        if self.world.clock.now < self.unreachable_until:
            return "refused"
        return self.armed.pop(kind, None) or self.armed.pop("any", None)

    def _call(self, kind: str, apply: Callable[[], T], answer: Callable[[T], None],
              silence: Callable[[str], None], lease_gone: Callable[[], None] | None = None,
              refused: Callable[[str], None] | None = None, faultless: bool = False) -> None:
        """Send ``apply`` to etcd; ``answer`` its result, ``silence`` etcd's silence,
        ``lease_gone`` etcd's refusal of a lease it no longer has, ``refused`` its refusal
        for good."""
        world, epoch = self.world, self._epoch
        fault = None if faultless else self._fault(kind)
        if fault == "refused":
            self.note(f"{kind}: refused before it reached etcd")
            self._later(world.uniform(*SILENCE_SECONDS), lambda: silence(f"{kind} refused"))
            return

        def at_etcd() -> None:
            try:
                result = apply()
            except LeaseGoneError:
                assert lease_gone is not None, f"{kind} wrote under a lease"
                self._later(world.latency(), lease_gone, epoch)
                return
            except RefusedError as exc:
                assert refused is not None, f"{kind} cannot be refused"
                error = str(exc)
                self.note(f"{kind}: refused by etcd: {error}")
                self._later(world.latency(), lambda: refused(error), epoch)
                return
            if fault == "lost":
                self.note(f"{kind}: applied at revision {world.etcd.revision}, answer lost")
                self._later(world.uniform(*SILENCE_SECONDS),
                            lambda: silence(f"{kind}: answer lost"), epoch)
            else:
                self._later(world.latency(), lambda: answer(result), epoch)

        world.clock.after(world.latency(), at_etcd)

    # --- the process and its session -----------------------------------------------------

    def start(self) -> None:
        """The process starts: read ``ctl/`` and watch it, take a lease, rendezvous."""
        world = self.world

        def at_etcd() -> None:
            if not self.alive:
                return
            revision = world.etcd.watch(self, self._deliver_later)
            items = world.etcd.items(world.keys.control_prefix)
            back = world.latency()
            self._watch_floor = world.clock.now + back
            self._later(back, lambda: loaded(revision, items))

        def loaded(revision: int, items: list[tuple[bytes, bytes]]) -> None:
            self.control = ControlView(world.keys, revision=revision)
            for key, value in items:
                self.control.apply(key, value)
            self._renewing = world.clock.now >= self.stalled_until
            self._call("grant", lambda: world.etcd.grant(world.settings.node_ttl), granted,
                       lambda _: None, faultless=True)

        def granted(lease: int) -> None:
            self._take(lease)
            self.started = True
            self.rendezvous()

        world.clock.after(world.latency(), at_etcd)

    def _take(self, lease: int) -> None:
        """The session holds ``lease`` now; its keep-alive renews it if it runs."""
        self.lease = lease
        if self._renewing:
            self.world.etcd.renewing(lease)

    def _lost(self, lease: int) -> None:
        """``NodeSession.lost``: etcd no longer has ``lease``."""
        if lease and self.lease == lease:
            self.note(f"lease {lease:x} lost")
            self.lease = 0
            self._wake()

    def stall(self, seconds: float) -> None:
        """The keep-alive stops for ``seconds``; then it renews the lease, or finds it lost."""
        world = self.world
        every = _renew_every(world.settings)
        if self._renewing and self.lease:
            world.etcd.stop_renewing(self.lease, world.clock.now - world.uniform(0, every))
        self._renewing = False
        self.stalled_until = max(self.stalled_until, world.clock.now + seconds)
        world.clock.at(self.stalled_until + world.uniform(0, every), self._resume)

    def _resume(self) -> None:
        if not self.alive or self._renewing or self.world.clock.now < self.stalled_until:
            return
        self._renewing = True
        if self.lease and not self.world.etcd.renewing(self.lease):
            self._lost(self.lease)

    def _end(self) -> None:
        """The process is gone: nothing renews its lease any more."""
        world = self.world
        if self._renewing and self.lease:
            every = _renew_every(world.settings)
            world.etcd.stop_renewing(self.lease, world.clock.now - world.uniform(0, every))
        self.alive = self._renewing = self.training = False
        self._epoch += 1
        world.etcd.unwatch(self)

    # --- the watch ---------------------------------------------------------------------------

    def _deliver_later(self, revision: int, key: bytes, value: bytes | None) -> None:
        world = self.world
        lagging = world.clock.now < self.lag_until
        when = max(world.clock.now + world.watch_delay(lagging), self._watch_floor)
        self._watch_floor = when
        world.clock.at(when, lambda: self._deliver(revision, key, value))

    def _deliver(self, revision: int, key: bytes, value: bytes | None) -> None:
        if not self.alive:
            return
        change = self.control.apply(key, value)
        self.control.revision = revision
        if change is None or change == "run_lease":
            return
        self.note(f"watch: {change} {key.rsplit(b'/', 1)[-1].lstrip(b'0').decode()}")
        self._wake()
        self._changed(change)

    def crash(self) -> None:
        self.note("crash")
        self._end()

    # --- the node's hooks (:class:`~.node.SimNode`) ----------------------------------------

    def rendezvous(self) -> None:
        """The agent starts a rendezvous."""
        raise NotImplementedError

    def _wake(self) -> None:
        """A waiting node looks again at once."""
        raise NotImplementedError

    def _changed(self, change: ControlChange) -> None:
        """The watch showed a change the node acts on."""
        raise NotImplementedError


def _cycle_kind(what: object) -> str:
    """A count or a wait, by kind and rule ('' for anything else): what a cycle repeats."""
    if isinstance(what, Count | Wait):
        return f"{type(what).__name__} {what.rule.name}"
    return ""


def _renew_every(settings: NativeSettings) -> float:
    """``NodeSession.renew_every``: at least three renewals per TTL."""
    return min(settings.keep_alive_interval, settings.node_ttl / 3)

