"""``EtcdStore``: a ``torch.distributed.Store`` over :class:`~etcd_rdzv.store.AsyncEtcdStore`."""

from __future__ import annotations

import datetime
from collections.abc import Coroutine
from typing import Any, TypeVar

from torch._C._distributed_c10d import Store
from torch.distributed import DistStoreError

from ..errors import StoreTimeoutError
from ..store import AsyncEtcdStore
from .backend import run_for_torch

__all__ = ["EtcdStore"]

T = TypeVar("T")

_DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


class EtcdStore(Store):
    """torch's ``Store`` over etcd, keys namespaced per run; blocking calls wait on watches.

    ``get`` and ``wait`` wait up to the store's timeout (``set_timeout``, default 300 s) and
    raise ``torch.distributed.DistStoreError`` naming the keys when it passes. Connection
    failures raise torch's ``RendezvousConnectionError``.
    """

    def __init__(self, store: AsyncEtcdStore, timeout: datetime.timedelta | None = None) -> None:
        super().__init__()
        self._async = store
        self.set_timeout(timeout or _DEFAULT_TIMEOUT)

    @property
    def async_store(self) -> AsyncEtcdStore:
        return self._async

    def _run(self, coroutine: Coroutine[Any, Any, T], waits: float = 0.0) -> T:
        read_timeout = self._async.client.config.read_timeout
        try:
            return run_for_torch(coroutine, read_timeout + waits)
        except StoreTimeoutError as exc:
            raise DistStoreError(str(exc)) from exc

    def _timeout_seconds(self, override: datetime.timedelta | None = None) -> float:
        # torch's stubs omit the C++ ``timeout`` property, which set_timeout() updates.
        timeout: datetime.timedelta = override if override is not None \
            else self.timeout  # type: ignore[attr-defined]
        return float(timeout.total_seconds())

    def set(self, key: str, value: str | bytes) -> None:
        self._run(self._async.set(key, value))

    def get(self, key: str) -> bytes:
        seconds = self._timeout_seconds()
        return self._run(self._async.get(key, seconds), waits=seconds)

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = self._timeout_seconds(timeout)
        self._run(self._async.wait(list(keys), seconds), waits=seconds)

    def check(self, keys: list[str]) -> bool:
        return self._run(self._async.check(list(keys)))

    def add(self, key: str, value: int) -> int:
        return self._run(self._async.add(key, value))

    def delete_key(self, key: str) -> bool:
        return self._run(self._async.delete_key(key))

    def num_keys(self) -> int:
        return self._run(self._async.num_keys())
