"""The rendezvous state in etcd: ``get_state`` and ``set_state``, one round trip each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from typing import Any, Final

from ._connection import UNTIL_CANCELLED, EtcdClient
from ._lease import AmortizedLease
from .cas import Expect, compare_and_swap
from .codec import StateCodec
from .config import DEFAULT_KEY_PREFIX, DEFAULT_TTL, RendezvousConfig
from .deadline import Deadline
from .errors import CompactedError
from .keys import RunKeys
from .state import decode_state

__all__ = ["AsyncEtcdRendezvousBackend"]

log = logging.getLogger(__name__)

_INT_TOKEN = re.compile(r"\s*\d+\s*")


def _log_compaction(task: asyncio.Task[bool]) -> None:
    if task.cancelled():
        return
    if task.exception() is not None:
        log.warning("compacting etcd's history failed: %s", task.exception())


class _Stale:
    """A token that cannot be a revision: the write is refused as stale."""


_STALE: Final = _Stale()


def _expected_revision(token: Any) -> int | _Stale | None:
    """``None`` for "create only", the revision a token names, or :data:`_STALE`."""
    if token is None:
        return None
    if isinstance(token, int) and not isinstance(token, bool):
        return token if token >= 0 else _STALE
    if isinstance(token, str) and _INT_TOKEN.fullmatch(token):
        return int(token)
    return _STALE


class AsyncEtcdRendezvousBackend:
    """torch's rendezvous backend contract over etcd v3, as coroutines, without torch.

    The state lives under one key, ``<key_prefix>/<run_id>``, in the stored form of
    :class:`~etcd_rdzv.codec.StateCodec`. The token is the key's ``mod_revision``, an int.

    Args:
        client: the connection to etcd (its ``read_timeout`` bounds every call).
        run_id: the rendezvous id; one key per run.
        key_prefix: where the state keys live.
        ttl: seconds an abandoned state survives its last write; see
            :class:`~etcd_rdzv._lease.AmortizedLease` for the exact bound.
        codec: the stored form (compression threshold, request size limit).
        conflict_backoff: when above 0, a conflicted ``set_state`` pauses a random time up to
            this many seconds, then reads the state afresh before returning it (one more
            round trip, on conflicts only), so that agents racing for the state spread out.
        compact_interval: when above 0, at most once per this many seconds a successful
            write is followed (in the background, adding no latency) by a compaction of
            etcd's history up to that write's revision. It affects etcd's whole keyspace:
            off by default; prefer etcd's own ``--auto-compaction-*`` settings.
        verify_state: when True, every state read from etcd (by ``get_state``, and the
            current state a conflicted ``set_state`` returns) is first checked with the
            restricted unpickler of :mod:`etcd_rdzv.state`; one that names anything but
            torch's state classes, datetime and builtin containers raises
            :class:`~etcd_rdzv.errors.EtcdStateError` instead of reaching ``pickle.loads``.
    """

    name = "etcd-v3"

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
        config = RendezvousConfig(
            etcd=client.config, run_id=run_id, key_prefix=key_prefix, ttl=ttl,
            conflict_backoff=conflict_backoff, compact_interval=compact_interval,
            verify_state=verify_state,
        )
        self._setup(client, config, codec)

    @classmethod
    def from_config(cls, client: EtcdClient,
                    config: RendezvousConfig) -> AsyncEtcdRendezvousBackend:
        """The backend for options parsed already (what the torch plug-in uses); the codec
        follows ``config.compress_threshold`` and ``config.max_request_bytes``."""
        backend = cls.__new__(cls)
        backend._setup(client, config, None)
        return backend

    def _setup(self, client: EtcdClient, config: RendezvousConfig,
               codec: StateCodec | None) -> None:
        self._client = client
        self._config = config
        self._key = RunKeys(config.run_id, config.key_prefix).state
        self._codec = codec or StateCodec(config.compress_threshold, config.max_request_bytes)
        self._lease = AmortizedLease(client, config.ttl)
        self._last_compaction = time.monotonic()
        self._compaction: asyncio.Task[bool] | None = None

    @property
    def key(self) -> bytes:
        """The etcd key that holds the state."""
        return self._key

    @property
    def client(self) -> EtcdClient:
        return self._client

    @property
    def lease(self) -> AmortizedLease:
        return self._lease

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    async def get_state(self) -> tuple[bytes, int] | None:
        """Return ``(state, token)``, or ``None`` when no state exists.

        One linearizable read; transient errors are retried within ``read_timeout``.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
            EtcdStateError: the stored value cannot be decoded (or, with ``verify_state``,
                is not a plain torch rendezvous state).
        """
        return await self._read(self._deadline())

    async def _read(self, deadline: Deadline) -> tuple[bytes, int] | None:
        response = await self._client.get(self._key, deadline)
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return self._decode(kv.value), int(kv.mod_revision)

    def _decode(self, value: bytes) -> bytes:
        """The state stored as ``value``; with ``verify_state``, checked before it is returned."""
        state = self._codec.decode(value, key=self._key)
        if self._config.verify_state:
            decode_state(state, key=self._key)
        return state

    async def set_state(
        self, state: bytes, token: Any | None = None
    ) -> tuple[bytes, int, bool] | None:
        """Write ``state`` if ``token`` is current; return the state etcd holds afterwards.

        * token current (the key's ``mod_revision``): writes; ``(state, new_token, True)``.
        * token stale: no write; ``(current_state, current_token, False)``.
        * token ``None`` (or 0, as in torch's etcd-v2 backend): writes only if no state
          exists, else as stale.
        * token not an int or an int-parsable string: no write, as stale.
        * no state exists and token is not ``None``: ``None``.

        Costs one ``Txn`` (compare ``mod_revision`` → ``Put``, else ``Range``): on conflict the
        current state and token come from the same round trip. A Txn that fails ambiguously
        (timeout, member lost) is resolved by :func:`~etcd_rdzv.cas.compare_and_swap`'s rules,
        exactly, since each stored value carries a random tag; all within ``read_timeout``.

        Raises:
            TypeError: ``state`` is not bytes.
            StateTooLargeError: ``state`` does not fit etcd's request limit (nothing sent).
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
            EtcdStateError: the current stored value (on conflict) cannot be decoded.
        """
        value = self._codec.encode(state, key=self._key)
        expected = _expected_revision(token)
        deadline = self._deadline()
        if isinstance(expected, _Stale):
            current = await self._read(deadline)
            return None if current is None else (*current, False)
        result = await compare_and_swap(
            self._client, self._key,
            Expect.absent() if expected is None else Expect.at_revision(expected),
            value, deadline, f"Writing the rendezvous state {self._key.decode()!r}",
            lease=self._lease, tagged=True,
        )
        if result.applied:
            self._maybe_compact(result.revision)
            return bytes(state), result.revision, True
        if result.value is None:
            return None
        if self._config.conflict_backoff > 0:
            await asyncio.sleep(random.uniform(0, self._config.conflict_backoff))
            fresh = await self._read(deadline)
            return None if fresh is None else (*fresh, False)
        return self._decode(result.value), result.revision, False

    def _maybe_compact(self, revision: int) -> None:
        """Start a background compaction up to ``revision`` if one is due."""
        now = time.monotonic()
        interval = self._config.compact_interval
        if not interval or now - self._last_compaction < interval \
                or (self._compaction is not None and not self._compaction.done()):
            return
        self._last_compaction = now
        self._compaction = asyncio.get_running_loop().create_task(
            self._client.compact(revision, Deadline.after(self._client.config.read_timeout)))
        self._compaction.add_done_callback(_log_compaction)

    async def wait_for_change(self, token: Any | None, timeout: float) -> bool:
        """Wait until the state's token differs from ``token``, or ``timeout`` s pass.

        Returns True as soon as the key is written or deleted after revision ``token`` (with
        ``token=None``: as soon as the key exists), False when ``timeout`` passes first. It
        follows the key from ``token + 1`` (:meth:`EtcdClient.follow`), so a write between
        the caller's read and this call is never missed. Transient failures (etcd
        unreachable, a broken watch) are waited out until ``timeout``, then it returns False
        (the caller re-reads either way). When etcd has compacted ``token + 1`` away, the key
        is read: True if it changed since ``token``, else it follows on from that read. A
        stale or invalid token returns at once.

        Raises:
            EtcdConnectionError: a permanent error (credentials or permission refused, a TLS
                misconfiguration), at once; never a
                :class:`~etcd_rdzv.errors.TransientError`.
        """
        expected = _expected_revision(token)
        if isinstance(expected, _Stale):
            return True
        try:
            return await asyncio.wait_for(self._changed_since(expected or 0), timeout)
        except asyncio.TimeoutError:
            return False

    async def _changed_since(self, revision: int) -> bool:
        """True once the key's ``mod_revision`` is no longer ``revision`` (0: absent)."""
        follow_from = None if revision == 0 else revision + 1
        while True:
            if follow_from is None:
                # Bounded by wait_for_change's timeout, which cancels it.
                response = await self._client.get(self._key, UNTIL_CANCELLED)
                current = int(response.kvs[0].mod_revision) if response.kvs else 0
                if current != revision:
                    return True
                follow_from = int(response.header.revision) + 1
            try:
                async with contextlib.aclosing(self._client.follow(self._key, follow_from)) \
                        as changes:
                    async for _ in changes:
                        return True
            except CompactedError as exc:
                log.debug("%s; reading the state key afresh", exc)
                follow_from = None
