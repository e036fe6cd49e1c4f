"""The rendezvous state in etcd: ``get_state`` and ``set_state``, one round trip each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from typing import Any, Final

from aetcd import rpc

from ._connection import EtcdClient
from ._lease import AmortizedLease
from .codec import StateCodec
from .config import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_TTL,
    validate_compact_interval,
    validate_conflict_backoff,
    validate_run_id,
)
from .deadline import Deadline
from .errors import CompactedError, EtcdConnectionError, UnavailableError
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
_RETRY: Final = object()


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
        validate_run_id(run_id)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"The option ttl must be a positive integer of seconds, got "
                             f"ttl={ttl!r}.")
        self._client = client
        self._run_id = run_id
        self._key = RunKeys(run_id, key_prefix).state
        self._codec = codec or StateCodec()
        self._lease = AmortizedLease(client, ttl)
        self._conflict_backoff = validate_conflict_backoff(conflict_backoff)
        self._compact_interval = validate_compact_interval(compact_interval)
        self._last_compaction = time.monotonic()
        self._compaction: asyncio.Task[bool] | None = None
        self._verify_state = bool(verify_state)

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
        if self._verify_state:
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
        (timeout, member lost) is never resent blindly: the key is read, and if it holds
        exactly the bytes written (each write carries a random tag) the write succeeded;
        if it still holds the expected revision the Txn is sent again, guarded by the same
        compare; otherwise the write lost to another one. All within ``read_timeout``.

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
        while True:
            if deadline.expired:
                raise EtcdConnectionError(
                    f"Writing the rendezvous state {self._key.decode()!r} did not complete within "
                    f"{deadline.seconds:g} s (read_timeout) at {self._client.config.targets}; "
                    "the last read showed it not applied."
                )
            try:
                response = await self._lease.write(
                    lambda lease_id: self._client.txn_once(
                        self._cas_request(value, expected, lease_id), deadline,
                        f"Writing the rendezvous state {self._key.decode()!r}",
                    ),
                    deadline,
                )
            except UnavailableError as exc:
                log.info("set_state outcome unknown (%s); reading to resolve it", exc)
                outcome = await self._resolve_ambiguous(state, value, expected, deadline)
                if outcome is _RETRY:
                    continue
                return outcome  # type: ignore[return-value]
            if response.succeeded:
                self._maybe_compact(int(response.header.revision))
                return bytes(state), int(response.header.revision), True
            result = self._on_conflict(state, value, response.responses[0].response_range.kvs)
            if self._conflict_backoff > 0 and result is not None and not result[2]:
                await asyncio.sleep(random.uniform(0, self._conflict_backoff))
                fresh = await self._read(deadline)
                return None if fresh is None else (*fresh, False)
            return result

    def _maybe_compact(self, revision: int) -> None:
        """Start a background compaction up to ``revision`` if one is due."""
        now = time.monotonic()
        if not self._compact_interval or now - self._last_compaction < self._compact_interval \
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
        watches from ``token + 1``, so a write between the caller's read and this call is
        never missed. It never raises on a transient error: a broken watch waits out the
        interval (the caller re-reads either way). A stale or invalid token returns at once.
        """
        expected = _expected_revision(token)
        if isinstance(expected, _Stale):
            return True
        started = time.monotonic()
        if expected is None or expected == 0:
            try:
                response = await self._client.get(self._key, Deadline.after(timeout))
            except EtcdConnectionError:
                return False
            if response.kvs:
                return True
            start = int(response.header.revision) + 1
        else:
            start = expected + 1
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            return False
        try:
            return await self._client.next_change(self._key, start, remaining) is not None
        except EtcdConnectionError:
            await asyncio.sleep(max(0.0, timeout - (time.monotonic() - started)))
            return False

    def _cas_request(self, value: bytes, expected: int | None, lease_id: int) -> rpc.TxnRequest:
        if expected is None:
            compare = rpc.Compare(key=self._key, result=rpc.Compare.EQUAL,
                                  target=rpc.Compare.CREATE, create_revision=0)
        else:
            compare = rpc.Compare(key=self._key, result=rpc.Compare.EQUAL,
                                  target=rpc.Compare.MOD, mod_revision=expected)
        return rpc.TxnRequest(
            compare=[compare],
            success=[rpc.RequestOp(
                request_put=rpc.PutRequest(key=self._key, value=value, lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key))],
        )

    def _on_conflict(
        self, state: bytes, value: bytes, kvs: Any
    ) -> tuple[bytes, int, bool] | None:
        if not kvs:
            return None
        kv = kvs[0]
        if kv.value == value:
            # An earlier attempt of this very write landed (the tag makes it ours).
            return bytes(state), int(kv.mod_revision), True
        return self._decode(kv.value), int(kv.mod_revision), False

    async def _resolve_ambiguous(
        self, state: bytes, value: bytes, expected: int | None, deadline: Deadline
    ) -> object:
        response = await self._client.get(self._key, deadline)
        kv = response.kvs[0] if response.kvs else None
        if kv is not None and kv.value == value:
            return bytes(state), int(kv.mod_revision), True
        current = int(kv.mod_revision) if kv is not None else 0
        if (expected is None and kv is None) or expected == current:
            return _RETRY  # not applied (yet); the compare still guards a resend
        # The key moved on. Our write, had it landed, was the first change after the revision
        # it compared against (for a create: the put that created the key as it is now), and
        # someone wrote over it since. The history tells which.
        if expected is not None:
            first = expected + 1
        else:
            assert kv is not None  # absent and no token returned _RETRY above
            first = int(kv.create_revision)
        landed_at = await self._first_change_if_ours(value, first, deadline)
        if landed_at is not None:
            return bytes(state), landed_at, True
        return self._on_conflict(state, value, [kv] if kv is not None else [])

    async def _first_change_if_ours(
        self, value: bytes, start_revision: int, deadline: Deadline
    ) -> int | None:
        """The revision of the key's first change from ``start_revision`` if it wrote
        ``value``, else None.

        Raises:
            EtcdConnectionError: that history is compacted, or unreadable within
                ``deadline``: the write's outcome cannot be known.
        """
        unknown = (f"Writing the rendezvous state {self._key.decode()!r} has an unknown "
                   "outcome: etcd failed during the write and the state has changed since")
        try:
            async with contextlib.aclosing(
                self._client.watch(self._key, start_revision, deadline)
            ) as events:
                event = await asyncio.wait_for(anext(events), max(0.001, deadline.remaining()))
        except CompactedError as exc:
            raise EtcdConnectionError(f"{unknown}, and etcd has compacted that history.") \
                from exc
        except (asyncio.TimeoutError, UnavailableError) as exc:
            raise EtcdConnectionError(f"{unknown}, and its history could not be read.") \
                from exc
        return event.revision if event.value == value else None
