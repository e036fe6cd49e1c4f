"""``EtcdStore``: a ``torch.distributed.Store`` over :class:`~etcd_rdzv.store.AsyncEtcdStore`."""

from __future__ import annotations

import datetime
from collections.abc import Coroutine
from typing import Any, TypeVar

from torch._C._distributed_c10d import Store

from ..store import AsyncEtcdStore
from ._portal import run_for_torch

__all__ = ["EtcdStore"]

T = TypeVar("T")

#: torch's default store timeout (c10d/Store.hpp).
_DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)


class EtcdStore(Store):
    """torch's ``Store`` over etcd; keys namespaced per run; blocking calls wait on watches.

    ``get``, ``wait`` and ``multi_get`` wait up to the store's timeout (``set_timeout``,
    default 300 s) and then raise ``torch.distributed.DistStoreError`` naming the missing
    keys. Connection failures raise torch's ``RendezvousConnectionError``. Every method runs
    the async store's coroutine on the process's event-loop thread and adds no logic.
    Not implemented: the queue calls (``queue_push``/``queue_pop``/``queue_len``), which
    torch's elastic agent does not use.
    """

    def __init__(self, store: AsyncEtcdStore, timeout: datetime.timedelta | None = None) -> None:
        super().__init__()
        self._async = store
        self.set_timeout(timeout or _DEFAULT_TIMEOUT)

    @property
    def async_store(self) -> AsyncEtcdStore:
        return self._async

    def _run(self, coroutine: Coroutine[Any, Any, T], waits: float = 0.0) -> T:
        return run_for_torch(coroutine, self._async.client.config.read_timeout + waits)

    def _seconds(self, override: datetime.timedelta | None = None) -> float:
        # torch's stubs omit the C++ ``timeout`` property, which set_timeout() updates.
        timeout: datetime.timedelta = override if override is not None \
            else self.timeout  # type: ignore[attr-defined]
        return float(timeout.total_seconds())

    def set(self, key: str, value: str | bytes) -> None:
        self._run(self._async.set(key, value))

    def get(self, key: str) -> bytes:
        seconds = self._seconds()
        return self._run(self._async.get(key, seconds), waits=seconds)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        seconds = self._seconds()
        return self._run(self._async.multi_get(keys, seconds), waits=seconds)

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        self._run(self._async.multi_set(keys, values))

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        seconds = self._seconds(timeout)
        self._run(self._async.wait(keys, seconds), waits=seconds)

    def check(self, keys: list[str]) -> bool:
        return self._run(self._async.check(keys))

    def compare_set(self, key: str, expected_value: str | bytes,
                    desired_value: str | bytes) -> bytes:
        return self._run(self._async.compare_set(key, expected_value, desired_value))

    def add(self, key: str, value: int) -> int:
        return self._run(self._async.add(key, value))

    def append(self, key: str, value: str | bytes) -> None:
        self._run(self._async.append(key, value))

    def delete_key(self, key: str) -> bool:
        return self._run(self._async.delete_key(key))

    def num_keys(self) -> int:
        return self._run(self._async.num_keys())

    def list_keys(self) -> list[str]:
        return self._run(self._async.list_keys())

    def has_extended_api(self) -> bool:
        return True
