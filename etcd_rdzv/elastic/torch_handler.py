"""``handler=torch``: torch's own ``DynamicRendezvousHandler``, made to outlive an etcd outage.

torch's agent calls ``num_nodes_waiting()`` every ``--monitor-interval`` while its workers
train, and does not catch ``RendezvousConnectionError``: with the stock handler, an etcd
outage longer than ``read_timeout`` ends every agent of the job, although the workers train
on without etcd. :class:`OutageTolerantRendezvousHandler` answers the last value it knew
instead, with a warning, and raises nothing; every other method is torch's.

What it cannot change is torch's state format: each node's heartbeat is a timestamp in the
one shared state, and ``_sanitize`` drops every node whose timestamp is older than
``keep_alive_interval * keep_alive_max_attempt``. After an outage longer than that, the
first node to read the state removes every participant, so a node that joins afterwards is
never admitted to the training world (docs/native.md; ``handler=native`` keeps heartbeats
on leases, which etcd extends when it comes back).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch.distributed.elastic.rendezvous import RendezvousConnectionError
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as _dr

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    from .backend import EtcdRendezvousBackend

__all__ = ["OutageTolerantRendezvousHandler", "create_torch_handler"]

log = logging.getLogger(__name__)


class OutageTolerantRendezvousHandler(_dr.DynamicRendezvousHandler):
    """torch's handler whose ``num_nodes_waiting()`` survives an etcd outage."""

    _last_waiting = 0

    def num_nodes_waiting(self) -> int:
        try:
            waiting = super().num_nodes_waiting()
        except RendezvousConnectionError as exc:
            log.warning("etcd is unreachable; num_nodes_waiting answers its last value, %d, "
                        "and the workers keep training (%s)", self._last_waiting, exc)
            return self._last_waiting
        self._last_waiting = waiting
        return waiting


def create_torch_handler(store: Store, backend: EtcdRendezvousBackend,
                         params: RendezvousParameters, *,
                         watch: bool) -> _dr.DynamicRendezvousHandler:
    """torch's handler as torch's ``create_handler`` builds it (with ``watch``, the
    watch-driven executor of :mod:`~etcd_rdzv.elastic.fast_handler`), outage-tolerant.

    Raises:
        Whatever torch's ``create_handler`` raises for invalid options.
    """
    if watch:
        from .fast_handler import create_fast_handler

        handler = create_fast_handler(store, backend, params)
    else:
        handler = _dr.create_handler(store, backend, params)
    if type(handler) is _dr.DynamicRendezvousHandler:
        # The subclass adds no state: the built handler becomes one, keeping torch's
        # construction (and its option parsing) as it is.
        handler.__class__ = OutageTolerantRendezvousHandler
    return handler
