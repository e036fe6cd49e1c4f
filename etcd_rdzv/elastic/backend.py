"""``EtcdRendezvousBackend``: torch's ``RendezvousBackend``, a sync face over the async core."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from torch.distributed.elastic.rendezvous.api import (
    RendezvousConnectionError,
    RendezvousStateError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from .._connection import EtcdClient
from ..backend import AsyncEtcdRendezvousBackend
from ..codec import StateCodec
from ..config import DEFAULT_KEY_PREFIX, DEFAULT_TTL
from ..errors import EtcdConnectionError, EtcdStateError
from ._portal import Portal

__all__ = ["EtcdRendezvousBackend"]

T = TypeVar("T")

#: Beyond the core's own read_timeout, so that the core's error (which says more) wins.
_PORTAL_GRACE = 5.0


def run_for_torch(coroutine: Coroutine[Any, Any, T], read_timeout: float) -> T:
    """Run on the portal; this project's errors become torch's rendezvous errors."""
    try:
        return Portal.get().run(coroutine, read_timeout + _PORTAL_GRACE)
    except (EtcdConnectionError, TimeoutError) as exc:
        raise RendezvousConnectionError(f"The connection to etcd has failed: {exc}") from exc
    except EtcdStateError as exc:
        raise RendezvousStateError(str(exc)) from exc


class EtcdRendezvousBackend(RendezvousBackend):
    """torch's rendezvous backend over etcd v3; see :class:`AsyncEtcdRendezvousBackend`.

    Each method runs the async backend's coroutine on the process's event-loop thread and
    waits for it; it is safe to call from several threads (torch's handler uses two). It has
    no logic of its own: results, tokens and round trips are the async backend's.

    Raises:
        RendezvousConnectionError: etcd was not reached within ``read_timeout``.
        RendezvousStateError: the stored state cannot be decoded or is too large to store;
            with ``verify_state``, also a state that is not a plain torch rendezvous state.
    """

    def __init__(
        self,
        client: EtcdClient,
        run_id: str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        ttl: int = DEFAULT_TTL,
        codec: StateCodec | None = None,
        conflict_backoff: float = 0.0,
        compact_interval: float = 0.0,
        verify_state: bool = False,
    ) -> None:
        self._async = AsyncEtcdRendezvousBackend(
            client, run_id, key_prefix=key_prefix, ttl=ttl, codec=codec,
            conflict_backoff=conflict_backoff, compact_interval=compact_interval,
            verify_state=verify_state,
        )

    @property
    def name(self) -> str:
        return AsyncEtcdRendezvousBackend.name

    @property
    def async_backend(self) -> AsyncEtcdRendezvousBackend:
        """The async backend this face runs, for code that has an event loop."""
        return self._async

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return run_for_torch(coroutine, self._async.client.config.read_timeout)

    def get_state(self) -> tuple[bytes, Token] | None:
        return self._run(self._async.get_state())

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        return self._run(self._async.set_state(state, token))

    def wait_for_change(self, token: Token | None, timeout: float) -> bool:
        """See :meth:`AsyncEtcdRendezvousBackend.wait_for_change`."""
        return self._run(self._async.wait_for_change(token, timeout))

    def close(self) -> None:
        """Close the etcd connection (shared with the store created alongside)."""
        self._run(self._async.client.close())
