"""``EtcdRendezvousBackend``: torch's ``RendezvousBackend``, a sync face over the async core."""

from __future__ import annotations

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from ..backend import AsyncEtcdRendezvousBackend
from ._portal import run_for_torch

__all__ = ["EtcdRendezvousBackend"]


class EtcdRendezvousBackend(RendezvousBackend):
    """torch's rendezvous backend over etcd v3: the sync face of
    :class:`~etcd_rdzv.backend.AsyncEtcdRendezvousBackend`.

    Each method runs the async backend's coroutine on the process's event-loop thread and
    waits for it; it is safe to call from several threads (torch's handler uses two). It has
    no logic of its own: results, tokens and round trips are the async backend's.

    Raises:
        RendezvousConnectionError: etcd was not reached within ``read_timeout``.
        RendezvousStateError: the stored state cannot be decoded or is too large to store;
            with ``verify_state``, also a state that is not a plain torch rendezvous state.
    """

    def __init__(self, backend: AsyncEtcdRendezvousBackend) -> None:
        self._async = backend
        self._seconds = backend.client.config.read_timeout

    @property
    def name(self) -> str:
        return AsyncEtcdRendezvousBackend.name

    @property
    def async_backend(self) -> AsyncEtcdRendezvousBackend:
        """The async backend this face runs, for code that has an event loop."""
        return self._async

    def get_state(self) -> tuple[bytes, Token] | None:
        return run_for_torch(self._async.get_state(), self._seconds)

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        return run_for_torch(self._async.set_state(state, token), self._seconds)

    def wait_for_change(self, token: Token | None, timeout: float) -> bool:
        """See :meth:`AsyncEtcdRendezvousBackend.wait_for_change`."""
        return run_for_torch(self._async.wait_for_change(token, timeout), self._seconds)

    def close(self) -> None:
        """Close the etcd connection (shared with the store created alongside)."""
        run_for_torch(self._async.client.close(), self._seconds)
