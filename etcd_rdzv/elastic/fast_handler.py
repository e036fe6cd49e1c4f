"""An opt-in handler that wakes on an etcd watch instead of torch's fixed 1 s poll.

torch's ``DynamicRendezvousHandler`` runs each rendezvous operation as a state machine; when
the machine says "wait" (``_Action.SYNC``) its executor sleeps one second
(``_delay(seconds=1)``) and reads the state again. :func:`create_fast_handler` builds the
very same handler through torch's own ``create_handler`` and swaps in one object, its
operation executor: :class:`WatchingRendezvousOpExecutor` answers ``SYNC`` by waiting for the
state key to change (:meth:`EtcdRendezvousBackend.wait_for_change`) and reading it at once,
so torch's sleep never runs. Everything else (the state machine, the state format, the
option parsing, the heartbeats, the errors) is torch's, unchanged.

The executor relies on torch's private names (``_DistributedRendezvousOpExecutor``,
``_Action``, ``_RendezvousContext``, ``_BackendRendezvousStateHolder`` and attributes of the
handler, the executor and the state holder). It is used only on the torch versions in
:data:`TESTED_TORCH_VERSIONS` and only when those names are present and shaped as expected;
otherwise :func:`create_fast_handler` returns torch's stock handler and warns once per
process (:class:`FastHandlerUnavailableWarning`). Nothing in torch is patched: other
handlers in the same process, whatever their backend, are untouched.

See docs/fast-handler.md.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import torch
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as _dr

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousSettings,
        _Action,
        _BackendRendezvousStateHolder,
        _NodeDesc,
        _RendezvousContext,
        _RendezvousState,
    )

    from .backend import EtcdRendezvousBackend

__all__ = [
    "MAX_WAIT",
    "TESTED_TORCH_VERSIONS",
    "FastHandlerUnavailableWarning",
    "WatchingRendezvousOpExecutor",
    "create_fast_handler",
    "is_fast_handler",
    "why_unavailable",
]

#: The longest single wait, in seconds: torch's own poll interval, so that deadlines,
#: heartbeats and dead nodes are checked at least as often as with the stock handler.
MAX_WAIT = 1.0

#: The torch releases (major, minor) this handler was checked against: 2.13 by the test
#: suite, 2.14 by its ``dynamic_rendezvous.py`` being identical to 2.13's. Widen only after
#: running tests/test_fast_handler.py on the new release.
TESTED_TORCH_VERSIONS: frozenset[tuple[int, int]] = frozenset({(2, 13), (2, 14)})

#: A wait that ends on a due time (last call, own heartbeat) ends this much after it, so
#: that the state machine, comparing against the clock, sees the time as passed.
_DUE_SLACK = 0.01

if TYPE_CHECKING:
    _ExecutorBase = _dr._DistributedRendezvousOpExecutor
else:
    # A torch without the class imports this module all the same; why_unavailable() then
    # refuses it, and the class below is never instantiated.
    _ExecutorBase = getattr(_dr, "_DistributedRendezvousOpExecutor", object)


class FastHandlerUnavailableWarning(RuntimeWarning):
    """``wait=watch`` was asked for, but torch's stock handler is used; the text says why."""


class WatchingRendezvousOpExecutor(_ExecutorBase):
    """torch's ``_DistributedRendezvousOpExecutor`` that waits on a watch, not a sleep.

    ``run`` is torch's own loop, given a state handler that never returns ``_Action.SYNC``:
    where torch's handler says ``SYNC``, this one waits until the state's token changes
    (``backend.wait_for_change``), reads the state afresh (bypassing the state holder's
    1 s cache) and asks torch's handler again. Each wait lasts at most :data:`MAX_WAIT`
    and ends no later than the operation's deadline, the round's last-call deadline and this
    node's next heartbeat, whichever comes first; so deadlines, heartbeats and dead nodes
    are checked at least once a second, as in torch, and usually sooner.

    Every other action (join, leave, keep-alive, complete, close, errors) is carried out
    by torch's code. Build it through :func:`create_fast_handler`.
    """

    def __init__(
        self,
        node: _NodeDesc,
        state_holder: _BackendRendezvousStateHolder,
        settings: RendezvousSettings,
        backend: EtcdRendezvousBackend,
    ) -> None:
        super().__init__(node, state_holder, settings)
        self._holder = state_holder
        self._watch_backend = backend

    def run(
        self,
        state_handler: Callable[[_RendezvousContext, float], _Action],
        deadline: float,
        update_deadline: Callable[[timedelta], float] | None = None,
    ) -> None:
        """torch's ``run``, with ``SYNC`` answered by :meth:`_wait_and_read`."""

        def watching_handler(ctx: _RendezvousContext, op_deadline: float) -> _Action:
            action = state_handler(ctx, op_deadline)
            while action == _dr._Action.SYNC:
                self._wait_and_read(ctx.state, op_deadline)
                # torch's loop applies the next action to self._state: the fresh state.
                self._state = self._holder.state
                ctx = _dr._RendezvousContext(self._node, self._state, self._settings)
                action = state_handler(ctx, op_deadline)
            return action

        super().run(watching_handler, deadline, update_deadline)

    def _wait_and_read(self, state: _RendezvousState, op_deadline: float) -> None:
        self._watch_backend.wait_for_change(self._holder._token, self._wait_seconds(
            state, op_deadline))
        # The state is read after every wait, changed or not: torch's sanitizer, which
        # drops nodes whose heartbeats expired, runs on each read, as in torch's poll.
        self._holder._last_sync_time = -1.0
        self._holder.sync()

    def _wait_seconds(self, state: _RendezvousState, op_deadline: float) -> float:
        """At most MAX_WAIT; less when the operation, the last call or a heartbeat is due."""
        seconds = MAX_WAIT
        left = op_deadline - time.monotonic()
        if left > 0:  # past its deadline (a redundant node waits on), a plain MAX_WAIT
            seconds = min(seconds, left)
        now = datetime.now(timezone.utc)
        last_heartbeat = state.last_heartbeats.get(self._node)
        heartbeat_due = None if last_heartbeat is None \
            else last_heartbeat + self._settings.keep_alive_interval
        for due in (state.deadline, heartbeat_due):
            if due is not None:
                due_in = (due - now).total_seconds()
                if due_in > 0:  # already due: the state machine acts on it, no wait to cut
                    seconds = min(seconds, due_in + _DUE_SLACK)
        return seconds


def _torch_release() -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _parameters(function: object) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []


#: The signatures the executor relies on, as parameter names.
_EXPECTED_SIGNATURES: dict[str, list[str]] = {
    "_DistributedRendezvousOpExecutor.__init__": ["self", "node", "state_holder", "settings"],
    "_DistributedRendezvousOpExecutor.run": ["self", "state_handler", "deadline",
                                             "update_deadline"],
    "_RendezvousContext.__init__": ["self", "node", "state", "settings"],
    "_BackendRendezvousStateHolder.sync": ["self"],
}

#: Instance attributes read or written, per object of a stock handler.
_EXPECTED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "handler": ("_this_node", "_settings", "_state_holder", "_op_executor"),
    "executor": ("_node", "_settings", "_state_holder"),
    "state holder": ("_token", "_last_sync_time", "_cache_duration"),
}


def _module_mismatch() -> str | None:
    """Why torch's module does not have the names the executor relies on, or None."""
    base = getattr(_dr, "_DistributedRendezvousOpExecutor", None)
    if base is None or base is not _ExecutorBase:
        return "torch's _DistributedRendezvousOpExecutor is missing or was replaced"
    for name in ("_RendezvousContext", "_BackendRendezvousStateHolder", "_Action",
                 "DynamicRendezvousHandler", "create_handler"):
        if not hasattr(_dr, name):
            return f"torch's dynamic_rendezvous has no {name}"
    if not hasattr(_dr._Action, "SYNC"):
        return "torch's _Action has no SYNC"
    for where, expected in _EXPECTED_SIGNATURES.items():
        owner, attribute = where.split(".")
        found = _parameters(getattr(getattr(_dr, owner), attribute, None))
        if found != expected:
            return f"torch's {where} takes {found}, expected {expected}"
    return None


def _handler_mismatch(handler: object) -> str | None:
    """Why ``handler`` is not the stock handler the executor can be put into, or None."""
    if type(handler) is not _dr.DynamicRendezvousHandler:
        return f"torch's create_handler returned a {type(handler).__name__}"
    executor = getattr(handler, "_op_executor", None)
    holder = getattr(handler, "_state_holder", None)
    if type(executor) is not _ExecutorBase:
        return f"the handler's executor is a {type(executor).__name__}"
    if not isinstance(holder, _dr._BackendRendezvousStateHolder):
        return f"the handler's state holder is a {type(holder).__name__}"
    for label, owner in (("handler", handler), ("executor", executor),
                         ("state holder", holder)):
        for attribute in _EXPECTED_ATTRIBUTES[label]:
            if not hasattr(owner, attribute):
                return f"torch's {label} has no attribute {attribute}"
    return None


def why_unavailable(handler: object | None = None) -> str | None:
    """Why the fast handler cannot be used with this torch (and ``handler``), or None.

    Checks, in order: the torch release is in :data:`TESTED_TORCH_VERSIONS`; torch's
    ``dynamic_rendezvous`` module has the private classes, enum member and signatures the
    executor relies on; and, given a handler built by torch's ``create_handler``, that it
    is the stock class with the stock executor and state holder and their attributes.
    """
    release = _torch_release()
    if release not in TESTED_TORCH_VERSIONS:
        tested = ", ".join(f"{major}.{minor}" for major, minor in sorted(TESTED_TORCH_VERSIONS))
        return f"torch {torch.__version__} is not a tested release ({tested})"
    return _module_mismatch() or (None if handler is None else _handler_mismatch(handler))


_warned = False
_warned_lock = threading.Lock()


def _warn_once(reason: str) -> None:
    global _warned
    with _warned_lock:
        if _warned:
            return
        _warned = True
    warnings.warn(
        f"etcd-v3 wait=watch: {reason}; using torch's stock rendezvous handler, which polls "
        "the state once a second.",
        FastHandlerUnavailableWarning,
        stacklevel=3,
    )


def create_fast_handler(
    store: Store, backend: EtcdRendezvousBackend, params: RendezvousParameters
) -> DynamicRendezvousHandler:
    """torch's ``DynamicRendezvousHandler`` that waits on etcd watches: see the module doc.

    Takes what torch's ``create_handler`` takes and builds the handler with it (same
    options: ``join_timeout``, ``last_call_timeout``, ``close_timeout``,
    ``heartbeat_timeout``, ``keep_alive_interval``, ``keep_alive_max_attempt``; same
    errors), then replaces its operation executor by a :class:`WatchingRendezvousOpExecutor`
    over ``backend``. The handler's rendezvous (ranks, rounds, world sizes, closing,
    timeouts, heartbeats, the state it writes) is torch's; only its waits end sooner. Agents
    with and without it can share a run.

    When :func:`why_unavailable` names a reason, the handler is returned as torch built it
    and a :class:`FastHandlerUnavailableWarning` is issued, once per process.

    Raises:
        Whatever torch's ``create_handler`` raises for invalid options.
    """
    handler = _dr.create_handler(store, backend, params)
    reason = why_unavailable(handler)
    if reason is not None:
        _warn_once(reason)
        return handler
    handler._op_executor = WatchingRendezvousOpExecutor(
        handler._this_node,
        handler._state_holder,  # type: ignore[arg-type]  # checked: a backend state holder
        handler._settings,
        backend,
    )
    return handler


def is_fast_handler(handler: object) -> bool:
    """Whether ``handler`` waits on watches (it came from :func:`create_fast_handler`)."""
    return isinstance(getattr(handler, "_op_executor", None), WatchingRendezvousOpExecutor)
