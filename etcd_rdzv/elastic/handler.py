"""``NativeRendezvousHandler``: torch's ``RendezvousHandler``, a sync face over
:class:`~etcd_rdzv.native.AsyncNativeRendezvous` (``--rdzv-conf handler=native``).

What torch's agent sees is what torch's ``DynamicRendezvousHandler`` gives it: the same
ranks for the same nodes, ``RendezvousInfo`` with a per-round ``PrefixStore``
(``torch.rendezvous.<run_id>.<round>``) and ``bootstrap_store_info``, the same errors, the
same rendezvous events. One difference, on purpose: ``MASTER_ADDR``/``MASTER_PORT`` are
published for every round, not only the first, so a node admitted in a later round never
waits for an address nobody publishes.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from torch.distributed import PrefixStore, TCPStore  # type: ignore[attr-defined]
from torch.distributed.elastic.events import construct_and_record_rdzv_event
from torch.distributed.elastic.events.api import NodeState
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from ._portal import run_for_torch

if TYPE_CHECKING:
    from ..native import AsyncNativeRendezvous
    from .store import EtcdStore

__all__ = ["NativeRendezvousHandler"]

#: torch's switch for reusing the agent's TCPStore in the workers.
_NO_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"

#: The join messages go to torch's handler's logger, word for word as torch writes them, so
#: that ``TORCH_LOGS``, log scrapers and dashboards built on torch's handler see them too.
log = logging.getLogger("torch.distributed.elastic.rendezvous.dynamic_rendezvous")


class NativeRendezvousHandler(RendezvousHandler):
    """torch's rendezvous handler over the native etcd protocol; see :mod:`etcd_rdzv.native`.

    Args:
        rendezvous: this node's async rendezvous.
        store: the run's store, returned (prefixed per round) in every ``RendezvousInfo``.
    """

    def __init__(self, rendezvous: AsyncNativeRendezvous, store: EtcdStore) -> None:
        self._async = rendezvous
        self._store = store
        self._read_seconds = store.async_store.client.config.read_timeout
        self._shared_store_server: TCPStore | None = None

    @property
    def async_rendezvous(self) -> AsyncNativeRendezvous:
        """The async rendezvous this face runs, for code that has an event loop."""
        return self._async

    def get_backend(self) -> str:
        return "etcd-v3"

    def get_run_id(self) -> str:
        return self._async.keys.run_id

    @property
    def use_agent_store(self) -> bool:
        return os.getenv(_NO_SHARED_STORE, "0") != "1"

    def _record(self, message: str, node_state: NodeState = NodeState.RUNNING,
                rank: int | None = None, method: str = "") -> None:
        node = self._async.node
        construct_and_record_rdzv_event(
            name=f"{type(self).__name__}.{method}", run_id=self.get_run_id(), message=message,
            node_state=node_state, hostname=node.addr, pid=node.pid, local_id=node.local_id,
            rank=rank)

    def next_rendezvous(self) -> RendezvousInfo:
        node, run_id = self._async.node, self.get_run_id()
        message = (f"The node '{node}' attempts to join the next round of the rendezvous "
                   f"'{run_id}'.")
        self._record(message, method="next_rendezvous")
        log.info(message)
        try:
            # No limit here: the core keeps join_timeout itself, and a standby (beyond
            # max_nodes) waits without one, as in torch's handler.
            admission = run_for_torch(self._async.next_rendezvous(), None)
        except Exception as exc:
            self._record(f"{type(exc).__name__}: {exc}", NodeState.FAILED,
                         method="next_rendezvous")
            raise
        rank = admission.rank
        message = (f"The node '{node}' has joined round {admission.round} of the rendezvous "
                   f"'{run_id}' as rank {rank} in a world of size {admission.world_size}.")
        self._record(message, rank=rank, method="next_rendezvous")
        log.info(message)
        store = PrefixStore(f"torch.rendezvous.{run_id}.{admission.round}", self._store)
        server_port: int | None = None
        if self.use_agent_store and rank == 0:
            if self._shared_store_server is None:
                self._shared_store_server = TCPStore(
                    host_name=node.addr, port=0, is_master=True, multi_tenant=True)
            server_port = self._shared_store_server.port
        bootstrap = RendezvousStoreInfo.build(rank, store, local_addr=node.addr,
                                              server_port=server_port)
        return RendezvousInfo(store, rank, admission.world_size, bootstrap)

    def is_closed(self) -> bool:
        return run_for_torch(self._async.is_closed(), self._read_seconds)

    def set_closed(self) -> None:
        run_for_torch(self._async.set_closed(), self._async.settings.close_timeout)
        self._record(f"The node '{self._async.node}' has closed the rendezvous "
                     f"'{self.get_run_id()}'.", NodeState.SUCCEEDED, method="set_closed")

    def num_nodes_waiting(self) -> int:
        return run_for_torch(self._async.num_nodes_waiting(), self._read_seconds)

    def shutdown(self) -> bool:
        closed = run_for_torch(self._async.shutdown(),
                               self._async.settings.close_timeout + self._read_seconds)
        if closed:
            self._record(f"The node '{self._async.node}' has closed the rendezvous "
                         f"'{self.get_run_id()}'.", NodeState.SUCCEEDED, method="shutdown")
        return closed
