"""A key-value store for one rendezvous run, with blocking reads that wait on watches."""

from __future__ import annotations

import re
import time

from aetcd import rpc

from ._connection import Deadline, EtcdClient, LeaseNotFoundError, UnavailableError
from ._lease import AmortizedLease
from .errors import EtcdConnectionError, StoreTimeoutError

__all__ = ["AsyncEtcdStore"]

_DECIMAL = re.compile(rb"\s*[+-]?\d+\s*")


def _to_bytes(name: str, value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"A store {name} must be str or bytes, got {type(value).__name__}.")


class AsyncEtcdStore:
    """Keys under ``prefix`` (``<key_prefix>/<run_id>/store/``), each written with a lease.

    Values are bytes (str is UTF-8 encoded). ``get`` and ``wait`` block on an etcd watch, never
    on polling. Every call's deadline is the client's ``read_timeout`` except the blocking
    ones, which take their own ``timeout``.

    Args:
        client: the connection to etcd.
        prefix: the key prefix of this store, ending in ``/``.
        lease: keeps the keys alive for its ttl after their last write; shared with the
            backend so that a run's keys go together.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, lease: AmortizedLease) -> None:
        if not prefix.endswith(b"/"):
            prefix += b"/"
        self._client = client
        self._prefix = prefix
        self._lease = lease

    @property
    def client(self) -> EtcdClient:
        return self._client

    @property
    def prefix(self) -> bytes:
        return self._prefix

    def _key(self, key: str | bytes) -> bytes:
        return self._prefix + _to_bytes("key", key)

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    async def set(self, key: str | bytes, value: str | bytes) -> None:
        """Write ``key`` (last writer wins)."""
        full_key, data, deadline = self._key(key), _to_bytes("value", value), self._deadline()
        while True:
            lease_id = await self._lease.lease_id(deadline)
            try:
                await self._client.put(full_key, data, lease_id, deadline)
                return
            except LeaseNotFoundError:
                self._lease.discard(lease_id)

    async def get(self, key: str | bytes, timeout: float) -> bytes:
        """Return the value of ``key``, waiting up to ``timeout`` s for it to be set.

        Raises:
            StoreTimeoutError: the key was not set within ``timeout``.
            EtcdConnectionError: etcd did not answer.
        """
        values = await self._wait_for([self._key(key)], timeout)
        return values[0]

    async def wait(self, keys: list[str | bytes] | list[str] | list[bytes], timeout: float) -> None:
        """Return once every key in ``keys`` is set; raise :class:`StoreTimeoutError` after
        ``timeout`` s."""
        await self._wait_for([self._key(key) for key in keys], timeout)

    async def _wait_for(self, keys: list[bytes], timeout: float) -> list[bytes]:
        started = time.monotonic()
        values: list[bytes] = []
        for key in keys:
            while True:
                response = await self._client.get(key, self._deadline())
                if response.kvs:
                    values.append(bytes(response.kvs[0].value))
                    break
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    missing = [k.removeprefix(self._prefix).decode(errors="replace")
                               for k in keys[len(values):]]
                    raise StoreTimeoutError(
                        f"Timed out after {timeout:g} s waiting for the store keys {missing} "
                        f"(under {self._prefix.decode(errors='replace')!r})."
                    )
                # The watch starts right after the revision read: no write can slip between.
                await self._client.next_change(key, int(response.header.revision) + 1, remaining)
        return values

    async def check(self, keys: list[str | bytes] | list[str] | list[bytes]) -> bool:
        """True when every key in ``keys`` is set now (one round trip)."""
        request = rpc.TxnRequest(success=[
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(k), count_only=True))
            for k in keys
        ])
        response = await self._client.txn_idempotent(request, self._deadline(), "Checking keys")
        return all(op.response_range.count > 0 for op in response.responses)

    async def add(self, key: str | bytes, amount: int) -> int:
        """Add ``amount`` to the decimal integer at ``key`` (absent counts as 0); return it.

        Each attempt is one compare-and-swap ``Txn`` whose failure branch returns the current
        value for the next attempt. A Txn with an unknown outcome is resent only if a read
        shows the key unchanged; otherwise :class:`EtcdConnectionError` is raised rather than
        risk adding twice.
        """
        full_key, deadline = self._key(key), self._deadline()
        response = await self._client.get(full_key, deadline)
        kv = response.kvs[0] if response.kvs else None
        while True:
            current = self._as_int(full_key, kv.value if kv else b"0")
            revision = int(kv.mod_revision) if kv else 0
            new_value = str(current + amount).encode()
            lease_id = await self._lease.lease_id(deadline)
            request = rpc.TxnRequest(
                compare=[rpc.Compare(key=full_key, result=rpc.Compare.EQUAL,
                                     target=rpc.Compare.MOD, mod_revision=revision)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(
                    key=full_key, value=new_value, lease=lease_id))],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=full_key))],
            )
            try:
                txn = await self._client.txn_once(request, deadline, f"Adding to {full_key!r}")
            except LeaseNotFoundError:
                self._lease.discard(lease_id)
                continue
            except UnavailableError as exc:
                check = await self._client.get(full_key, deadline)
                now = check.kvs[0] if check.kvs else None
                if (int(now.mod_revision) if now else 0) == revision:
                    continue
                raise EtcdConnectionError(
                    f"Adding {amount} to {full_key.decode(errors='replace')!r} has an unknown "
                    "outcome: the key changed while etcd was unavailable. Not retried, so as "
                    "not to add twice."
                ) from exc
            if txn.succeeded:
                return current + amount
            kvs = txn.responses[0].response_range.kvs
            kv = kvs[0] if kvs else None

    @staticmethod
    def _as_int(key: bytes, value: bytes) -> int:
        if not _DECIMAL.fullmatch(value):
            raise ValueError(f"The store key {key.decode(errors='replace')!r} holds {value!r}, "
                             "not a decimal integer; add() cannot increment it.")
        return int(value)

    async def delete_key(self, key: str | bytes) -> bool:
        """Delete ``key``; True if it existed."""
        return await self._client.delete(self._key(key), self._deadline()) > 0

    async def num_keys(self) -> int:
        """The number of keys in this store."""
        response = await self._client.get_prefix(self._prefix, self._deadline(), count_only=True)
        return int(response.count)
