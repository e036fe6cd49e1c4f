"""A key-value store for one rendezvous run, with blocking reads that wait on watches.

Semantics follow torch's ``TCPStore`` (the default c10d store), so that code written against
it behaves the same here; ``tests/test_store_parity.py`` runs one suite against both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from aetcd import rpc

from ._connection import EtcdClient
from ._lease import LeaseHolder
from .cas import Expect, compare_and_swap
from .deadline import Deadline
from .errors import CompactedError, EtcdConnectionError, StoreTimeoutError

__all__ = ["MAX_TXN_OPS", "AsyncEtcdStore"]

log = logging.getLogger(__name__)

#: etcd's default ``--max-txn-ops``: a Txn of more operations is refused.
MAX_TXN_OPS = 128

#: Upper bound of the random pause after a lost compare-and-swap in add/append, seconds.
_UPDATE_BACKOFF = 0.01

_DECIMAL = re.compile(rb"\s*[+-]?\d+\s*")

Keys = Sequence[str] | Sequence[bytes] | Sequence[str | bytes]


def _to_bytes(name: str, value: str | bytes) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"A store {name} must be str or bytes, got {type(value).__name__}.")


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i:i + MAX_TXN_OPS] for i in range(0, len(items), MAX_TXN_OPS)] or [items]


class AsyncEtcdStore:
    """Keys under ``prefix`` (``<key_prefix>/<run_id>/store/``), each written with a lease.

    Values are bytes (str is UTF-8 encoded). ``get``, ``wait`` and ``multi_get`` block on an
    etcd watch, never on polling, for up to their ``timeout``; every other call is bounded by
    the client's ``read_timeout``.

    Args:
        client: the connection to etcd.
        prefix: the key prefix of this store; a ``/`` is added if missing.
        lease: keeps the keys alive for its ttl after their last write; shared with the
            backend so that a run's keys go together.
    """

    def __init__(self, client: EtcdClient, prefix: bytes, lease: LeaseHolder) -> None:
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

    def _name(self, full_key: bytes) -> str:
        return full_key.removeprefix(self._prefix).decode(errors="replace")

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    async def set(self, key: str | bytes, value: str | bytes) -> None:
        """Write ``key`` (last writer wins). One round trip."""
        full_key, data, deadline = self._key(key), _to_bytes("value", value), self._deadline()
        await self._lease.write(
            lambda lease_id: self._client.put(full_key, data, lease_id, deadline), deadline
        )

    async def multi_set(self, keys: Keys, values: Sequence[str | bytes]) -> None:
        """Write several keys in one ``Txn`` (one per 128 keys, etcd's limit per Txn).

        A key given twice takes its last value. Each Txn is atomic, a split batch is not.
        """
        if len(keys) != len(values):
            raise ValueError(f"multi_set needs as many values as keys, got {len(keys)} keys "
                             f"and {len(values)} values.")
        latest = {self._key(k): _to_bytes("value", v) for k, v in zip(keys, values, strict=True)}
        deadline = self._deadline()
        for chunk in _chunks(list(latest.items())):
            await self._lease.write(
                lambda lease_id, chunk=chunk: self._client.txn_idempotent(  # type: ignore[misc]
                    rpc.TxnRequest(success=[
                        rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=v, lease=lease_id))
                        for k, v in chunk
                    ]),
                    deadline, f"Writing {len(chunk)} store keys",
                ),
                deadline,
            )

    async def _read_many(self, keys: Sequence[bytes]) -> tuple[list[bytes | None], int]:
        """The values of ``keys`` (None where absent) and the revision they were read at."""
        deadline = self._deadline()
        values: list[bytes | None] = []
        revision = 0
        for chunk in _chunks(keys):
            response = await self._client.txn_idempotent(
                rpc.TxnRequest(success=[
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=k)) for k in chunk
                ]),
                deadline, f"Reading {len(chunk)} store keys",
            )
            revision = int(response.header.revision)
            for op in response.responses:
                kvs = op.response_range.kvs
                values.append(bytes(kvs[0].value) if kvs else None)
        return values, revision

    async def _wait_for(self, keys: Sequence[bytes], timeout: float) -> list[bytes]:
        """The values of ``keys`` once all are set: one read, then a follow of each missing
        key (whose put event carries the value, so a wake-up costs no further round trip).

        Transient failures while waiting (etcd unreachable, a broken watch) are waited out
        until ``timeout``: :meth:`EtcdClient.follow` resumes without missing a put.
        """
        started = time.monotonic()
        values, revision = await self._read_many(keys)
        for index, key in enumerate(keys):
            while values[index] is None:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    missing = [k for k, v in zip(keys, values, strict=True) if v is None]
                    raise StoreTimeoutError(
                        f"Timed out after {timeout:g} s waiting for the store keys "
                        f"{[self._name(k) for k in missing]} "
                        f"(under {self._prefix.decode(errors='replace')!r})."
                    )
                try:
                    # Following from the revision just read: no write can slip in between.
                    value = await asyncio.wait_for(self._next_value(key, revision + 1),
                                                   remaining)
                except asyncio.TimeoutError:
                    continue  # the loop raises StoreTimeoutError, naming the keys still missing
                if value is not None:
                    values[index] = value
                else:  # etcd compacted the history the follow needed: read again
                    values, revision = await self._read_many(keys)
        return [value for value in values if value is not None]

    async def _next_value(self, key: bytes, from_revision: int) -> bytes | None:
        """The value of the first put of ``key`` from ``from_revision`` on; None when etcd
        has compacted that revision away (read the key instead)."""
        try:
            async with contextlib.aclosing(self._client.follow(key, from_revision)) as changes:
                async for change in changes:
                    if change.value is not None:
                        return change.value
        except CompactedError as exc:
            log.debug("%s; reading the store keys afresh", exc)
            return None
        raise AssertionError("a follow ends only when its caller stops it")

    async def get(self, key: str | bytes, timeout: float) -> bytes:
        """The value of ``key``, waiting up to ``timeout`` s for it to be set.

        Raises:
            StoreTimeoutError: the key was not set within ``timeout``; names the key.
        """
        return (await self._wait_for([self._key(key)], timeout))[0]

    async def multi_get(self, keys: Keys, timeout: float) -> list[bytes]:
        """The values of ``keys``, in order, waiting up to ``timeout`` s for all to be set.

        Raises:
            StoreTimeoutError: some key was not set within ``timeout``; names the missing ones.
        """
        return await self._wait_for([self._key(k) for k in keys], timeout)

    async def wait(self, keys: Keys, timeout: float) -> None:
        """Return once every key in ``keys`` is set.

        Raises:
            StoreTimeoutError: some key was not set within ``timeout``; names the missing ones.
        """
        await self._wait_for([self._key(k) for k in keys], timeout)

    async def check(self, keys: Keys) -> bool:
        """True when every key in ``keys`` is set now. One read, no waiting."""
        values, _ = await self._read_many([self._key(k) for k in keys])
        return all(value is not None for value in values)

    async def compare_set(
        self, key: str | bytes, expected: str | bytes, desired: str | bytes
    ) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected``; return what it holds after.

        As ``TCPStore``: an empty ``expected`` means "only if absent". When the swap does not
        happen the current value is returned, or ``expected`` if the key is absent. One
        ``Txn`` per attempt; an ambiguous attempt is resolved by reading (the answer is the
        current value either way) and resent only if the key still holds ``expected``
        (:func:`~etcd_rdzv.cas.compare_and_swap`).
        """
        full_key = self._key(key)
        old, new = _to_bytes("expected value", expected), _to_bytes("desired value", desired)
        result = await compare_and_swap(
            self._client, full_key, Expect.holding(old) if old else Expect.absent(), new,
            self._deadline(), f"compare_set on {self._name(full_key)!r}", lease=self._lease,
        )
        if result.applied:
            return new
        # On a conflict, and on an unknown outcome alike, the answer is what the key holds.
        return result.value if result.value is not None else old

    async def add(self, key: str | bytes, amount: int) -> int:
        """Add ``amount`` to the decimal integer at ``key`` (absent counts as 0); return it.

        Raises:
            ValueError: the key holds something other than a decimal integer.
            EtcdConnectionError: the outcome is unknown (see :meth:`_update`).
        """
        full_key = self._key(key)

        def increment(value: bytes | None) -> bytes:
            if value is not None and not _DECIMAL.fullmatch(value):
                raise ValueError(f"The store key {self._name(full_key)!r} holds {value!r}, "
                                 "not a decimal integer; add() cannot increment it.")
            return str(int(value or b"0") + amount).encode()

        return int(await self._update(full_key, increment, f"Adding {amount} to"))

    async def append(self, key: str | bytes, value: str | bytes) -> None:
        """Append ``value`` to the bytes at ``key`` (absent counts as empty)."""
        suffix = _to_bytes("value", value)
        await self._update(self._key(key), lambda current: (current or b"") + suffix,
                           "Appending to")

    async def _update(
        self, full_key: bytes, transform: Callable[[bytes | None], bytes], what: str
    ) -> bytes:
        """Read-modify-write ``full_key`` with compare-and-swap; return the value written.

        Each attempt is one ``Txn`` whose failure branch reads the value for the next one.
        An attempt with an unknown outcome is resent only if a read shows the key unchanged
        (:func:`~etcd_rdzv.cas.compare_and_swap`); otherwise :class:`EtcdConnectionError` is
        raised rather than risk applying it twice (the value carries no tag to tell).
        """
        deadline = self._deadline()
        response = await self._client.get(full_key, deadline)
        kv = response.kvs[0] if response.kvs else None
        revision, current = (int(kv.mod_revision), bytes(kv.value)) if kv is not None \
            else (0, None)
        while True:
            new_value = transform(current)
            result = await compare_and_swap(
                self._client, full_key, Expect.at_revision(revision), new_value, deadline,
                f"{what} {self._name(full_key)!r}", lease=self._lease,
            )
            if result.applied:
                return new_value
            if result.outcome == "unknown":
                raise EtcdConnectionError(
                    f"{what} {self._name(full_key)!r} has an unknown outcome: the key changed "
                    "while etcd was unavailable. Not retried, so as not to apply it twice."
                )
            revision, current = result.revision, result.value
            # Callers that collided retry at once otherwise, and collide again.
            await asyncio.sleep(random.uniform(0, _UPDATE_BACKOFF))

    async def delete_key(self, key: str | bytes) -> bool:
        """Delete ``key``; True if it existed."""
        return await self._client.delete(self._key(key), self._deadline()) > 0

    async def num_keys(self) -> int:
        """The number of keys in this store."""
        response = await self._client.get_prefix(self._prefix, self._deadline(), count_only=True)
        return int(response.count)

    async def list_keys(self) -> list[str]:
        """The keys of this store, without the prefix, sorted."""
        response = await self._client.get_prefix(self._prefix, self._deadline(), keys_only=True)
        return sorted(self._name(kv.key) for kv in response.kvs)

    async def delete_all(self) -> int:
        """Delete every key of this store; return how many went."""
        return await self._client.delete(self._prefix, self._deadline(), prefix=True)
