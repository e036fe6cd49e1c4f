"""Rendezvous runs seen from outside: list, inspect, watch, close and delete them. No torch.

:class:`RendezvousAdmin` is the async API an orchestrator (or the ``etcd-rdzv`` command)
uses next to the agents. It reads torch's state only through the restricted unpickler of
:mod:`etcd_rdzv.state`, so a hostile state is refused rather than run.

The keys it reads are laid out in :mod:`etcd_rdzv.keys`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from aetcd import rpc, utils

from ._connection import EtcdClient
from ._lease import lease_window
from .backend import AsyncEtcdRendezvousBackend
from .codec import StateCodec
from .config import DEFAULT_KEY_PREFIX, DEFAULT_TTL, validate_key_prefix
from .deadline import Deadline
from .errors import (
    CompactedError,
    EtcdConnectionError,
    EtcdStateError,
    NotATorchStateError,
    RunNotFoundError,
    UnavailableError,
)
from .keys import RunKeys, parse_run_key, runs_prefix
from .state import RendezvousStateView, decode_state, encode_closed

__all__ = ["RendezvousAdmin", "RunInfo", "RunNotFoundError", "StateSnapshot"]

log = logging.getLogger(__name__)

#: Lease look-ups in flight at once while listing runs.
_LEASE_CONCURRENCY = 16
_WATCH_BACKOFF_INITIAL = 0.1
_WATCH_BACKOFF_MAX = 2.0


@dataclass(frozen=True)
class RunInfo:
    """One run under the key prefix, as :meth:`RendezvousAdmin.list_runs` found it."""

    run_id: str
    revision: int | None
    """The state's ``mod_revision`` (its token); None when the run has store keys only."""
    created_revision: int | None
    """The revision at which the state key was created."""
    version: int
    """How many times the state was written since it was created (0: no state)."""
    state_bytes: int
    """The state's stored size (header, possibly compressed)."""
    lease: int
    """The lease of the state key (0: none)."""
    store_keys: int
    """How many keys the run's store holds."""
    store_bytes: int
    """The size of the store's values."""
    last_revision: int
    """The newest ``mod_revision`` among the run's keys: its last write."""
    idle_seconds: float | None
    """At least this long has passed since the run's last write; None when unknown (the
    newest key has no lease, or its lease is gone). Measured by etcd's clock from the lease
    of the newest key, which was granted at most one lease window (``ttl/10``, 1 to 60 s)
    before that write; the window is subtracted, so the figure never overstates."""
    ttl_left: int | None
    """Seconds until the newest key's lease expires, taking the run's keys along with it
    (torch's writes renew it); None when unknown."""
    state: RendezvousStateView | None
    """The decoded state; None without a state or when it could not be decoded."""
    error: str | None
    """Why the state could not be decoded, if it could not."""
    not_a_torch_state: bool = False
    """The state key holds something other than torch's rendezvous state (another program
    wrote it): :class:`~etcd_rdzv.errors.NotATorchStateError`, not a corrupt state."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (what ``etcd-rdzv list --json`` prints)."""
        state = self.state
        return {
            "run_id": self.run_id,
            "revision": self.revision,
            "created_revision": self.created_revision,
            "version": self.version,
            "state_bytes": self.state_bytes,
            "lease": self.lease,
            "store_keys": self.store_keys,
            "store_bytes": self.store_bytes,
            "last_revision": self.last_revision,
            "idle_seconds": None if self.idle_seconds is None else round(self.idle_seconds, 1),
            "ttl_left": self.ttl_left,
            "round": state.round if state is not None else None,
            "complete": state.complete if state is not None else None,
            "closed": state.closed if state is not None else None,
            "world_size": state.world_size if state is not None else None,
            "error": self.error,
            "not_a_torch_state": self.not_a_torch_state,
        }


@dataclass(frozen=True)
class StateSnapshot:
    """A run's state at one revision: what :meth:`RendezvousAdmin.watch_state` yields."""

    run_id: str
    revision: int
    """The state's ``mod_revision``; when there is no state, the revision of its deletion
    or of the read that found none."""
    state: RendezvousStateView | None
    """The decoded state; None when the run has no state (not created yet, or deleted)."""
    stored_bytes: int = 0
    """The state's stored size."""
    lease: int = 0
    """The state key's lease (0: none)."""


@dataclass
class _RunKeys:
    state: Any = None  # the state's KeyValue, if any
    store_keys: int = 0
    store_bytes: int = 0
    newest: Any = None  # the KeyValue with the highest mod_revision



class RendezvousAdmin:
    """List, inspect, watch, close and delete the rendezvous runs under one key prefix.

    Args:
        client: the connection to etcd; its ``read_timeout`` bounds each call (a watch's
            reads and re-opens too).
        key_prefix: where the runs' keys live, as the agents' ``key_prefix`` option.
        ttl: the TTL given to the state when :meth:`close_run` writes it, in seconds.
        codec: the stored form, for :meth:`close_run`'s write (compression threshold,
            request size limit); the default suits states written with the defaults.
    """

    def __init__(
        self,
        client: EtcdClient,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        ttl: int = DEFAULT_TTL,
        codec: StateCodec | None = None,
    ) -> None:
        self._client = client
        self._prefix = validate_key_prefix(key_prefix)
        self._ttl = ttl
        self._codec = codec or StateCodec()

    @property
    def client(self) -> EtcdClient:
        return self._client

    @property
    def key_prefix(self) -> str:
        return self._prefix

    def state_key(self, run_id: str) -> bytes:
        """The etcd key of ``run_id``'s state."""
        return RunKeys(run_id, self._prefix).state

    def _deadline(self) -> Deadline:
        return Deadline.after(self._client.config.read_timeout)

    def _decode(self, value: bytes, key: bytes) -> RendezvousStateView:
        return decode_state(self._codec.decode(value, key=key), key=key)

    async def list_runs(self) -> list[RunInfo]:
        """Every run under the key prefix, sorted by run id.

        A run is any key of the layout in :mod:`etcd_rdzv.keys` (the state, store keys);
        other keys under the prefix are not runs and are left out. One range read of the
        prefix, then one lease look-up per run (for ``idle_seconds`` and ``ttl_left``). A
        state that cannot be decoded is listed with ``error`` set (and ``not_a_torch_state``
        when another program wrote it).

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        response = await self._client.get_prefix(runs_prefix(self._prefix), self._deadline())
        runs: dict[str, _RunKeys] = defaultdict(_RunKeys)
        for kv in response.kvs:
            parsed = parse_run_key(self._prefix, bytes(kv.key))
            if parsed is None or parsed[1] == "native":
                continue  # not a key of this layout (another prefix nested here, say)
            run_id, kind = parsed
            if kind == "state":
                runs[run_id].state = kv
            else:
                runs[run_id].store_keys += 1
                runs[run_id].store_bytes += len(kv.value)
            newest = runs[run_id].newest
            if newest is None or kv.mod_revision > newest.mod_revision:
                runs[run_id].newest = kv
        leases = await self._lease_ages({int(r.newest.lease) for r in runs.values()
                                         if r.newest.lease})
        now = time.monotonic()
        infos = []
        for run_id in sorted(runs):
            keys = runs[run_id]
            state, error, foreign = None, None, False
            if keys.state is not None:
                try:
                    state = self._decode(bytes(keys.state.value), bytes(keys.state.key))
                except EtcdStateError as exc:
                    error, foreign = str(exc), isinstance(exc, NotATorchStateError)
            idle, ttl_left = None, None
            lease = leases.get(int(keys.newest.lease))
            if lease is not None:
                left, granted, read_at = lease
                age = granted - left + (now - read_at)
                # lease_window of the granted TTL bounds the window of the TTL it was
                # granted for (ttl + window), so the figure never overstates.
                idle = max(0.0, age - lease_window(granted) - 1)
                ttl_left = left
            kv = keys.state
            infos.append(RunInfo(
                run_id=run_id,
                revision=int(kv.mod_revision) if kv is not None else None,
                created_revision=int(kv.create_revision) if kv is not None else None,
                version=int(kv.version) if kv is not None else 0,
                state_bytes=len(kv.value) if kv is not None else 0,
                lease=int(kv.lease) if kv is not None else 0,
                store_keys=keys.store_keys,
                store_bytes=keys.store_bytes,
                last_revision=int(keys.newest.mod_revision),
                idle_seconds=idle,
                ttl_left=ttl_left,
                state=state,
                error=error,
                not_a_torch_state=foreign,
            ))
        return infos

    async def _lease_ages(self, lease_ids: Iterable[int]) -> dict[int, tuple[int, int, float]]:
        """``lease -> (seconds left, seconds granted, when read)`` for the leases that live."""
        semaphore = asyncio.Semaphore(_LEASE_CONCURRENCY)
        deadline = self._deadline()

        async def one(lease_id: int) -> tuple[int, tuple[int, int, float]]:
            async with semaphore:
                lease = await self._client.lease_status(lease_id, deadline)
                return lease_id, (lease.ttl, lease.granted_ttl, time.monotonic())

        results = await asyncio.gather(*(one(lease_id) for lease_id in lease_ids))
        return {lease_id: info for lease_id, info in results if info[0] >= 0 and info[1] > 0}

    async def snapshot(self, run_id: str) -> StateSnapshot:
        """The run's state now, with its revision (``state`` None when there is none).

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
            EtcdStateError: the state cannot be decoded, or is not a plain torch state.
        """
        key = self.state_key(run_id)
        response = await self._client.get(key, self._deadline())
        if not response.kvs:
            return StateSnapshot(run_id, int(response.header.revision), None)
        kv = response.kvs[0]
        return StateSnapshot(run_id, int(kv.mod_revision), self._decode(bytes(kv.value), key),
                             len(kv.value), int(kv.lease))

    async def status(self, run_id: str) -> RendezvousStateView | None:
        """The run's state now; None when the run has no state.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
            EtcdStateError: the state cannot be decoded, or is not a plain torch state.
        """
        return (await self.snapshot(run_id)).state

    async def watch_state(
        self, run_id: str, *, start_revision: int | None = None
    ) -> AsyncGenerator[StateSnapshot, None]:
        """The run's state, then every change of it, until the caller stops iterating.

        First the current state (a read; with ``start_revision``, instead, the changes from
        that revision on), then one snapshot per write or deletion, in order, each with its
        revision. The watch survives etcd's failures: when its stream breaks it is opened
        again from the revision after the last one yielded, so no change is lost or
        repeated; when etcd has compacted that revision away, the state is read afresh (the
        changes in between are gone from etcd's history) and watched from there. Transient
        failures are retried for as long as the iteration goes on, with a backoff up to 2 s.

        Raises:
            EtcdStateError: a state cannot be decoded, or is not a plain torch state.
            EtcdAuthError: the credentials or permissions were refused.
            EtcdConnectionError: an error that retrying does not cure.
        """
        key = self.state_key(run_id)
        watch_from = start_revision
        # What was yielded last: (revision, True) for a state, (0, False) for none. A re-read
        # that finds the same (after a compaction) is not yielded again.
        last: tuple[int, bool] | None = None
        backoff = _WATCH_BACKOFF_INITIAL
        while True:
            try:
                if watch_from is None:
                    response = await self._client.get(key, self._deadline())
                    snapshot = self._from_read(run_id, key, response)
                    seen = (snapshot.revision, True) if snapshot.state is not None else (0, False)
                    if seen != last:
                        last = seen
                        yield snapshot
                    watch_from = int(response.header.revision) + 1
                async with aclosing(self._client.watch(key, watch_from, self._deadline())) \
                        as events:
                    async for event in events:
                        backoff = _WATCH_BACKOFF_INITIAL
                        watch_from = event.revision + 1
                        if event.value is None:
                            snapshot = StateSnapshot(run_id, event.revision, None)
                            last = (0, False)
                        else:
                            snapshot = StateSnapshot(run_id, event.revision,
                                                     self._decode(event.value, key),
                                                     len(event.value), event.lease)
                            last = (event.revision, True)
                        yield snapshot
            except CompactedError as exc:
                log.info("%s; reading the state afresh", exc)
                watch_from = None
            except UnavailableError as exc:
                log.info("watching %r: %s; resuming from revision %s", run_id, exc, watch_from)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, _WATCH_BACKOFF_MAX)

    def _from_read(self, run_id: str, key: bytes, response: Any) -> StateSnapshot:
        if not response.kvs:
            return StateSnapshot(run_id, int(response.header.revision), None)
        kv = response.kvs[0]
        return StateSnapshot(run_id, int(kv.mod_revision), self._decode(bytes(kv.value), key),
                             len(kv.value), int(kv.lease))

    async def close_run(self, run_id: str) -> bool:
        """Close the rendezvous, as torch's ``set_closed()`` does: the state with
        ``closed=True``, written by compare-and-swap.

        Agents see it on their next read of the state: ``is_closed()`` turns True; a node
        that joins or re-joins (after a failure or a membership change) gets
        ``RendezvousClosedError``, and a node in the redundancy list exits gracefully, instead
        of waiting for a new round. Workers that are running are not interrupted. It is what
        torch's agents do themselves when a job ends. A write that loses to an agent's (a
        heartbeat) is tried again on the state that won, until ``read_timeout``.

        Returns:
            True when this call closed it; False when it was closed already.

        Raises:
            RunNotFoundError: the run has no state.
            EtcdStateError: the state cannot be decoded, or is not a plain torch state.
            EtcdConnectionError: etcd did not answer, or other writers kept winning, within
                ``read_timeout``.
        """
        backend = AsyncEtcdRendezvousBackend(
            self._client, run_id, key_prefix=self._prefix, ttl=self._ttl, codec=self._codec)
        deadline = self._deadline()
        current = await backend.get_state()
        conflicts = 0
        while True:
            if current is None:
                raise RunNotFoundError(f"The run {run_id!r} has no rendezvous state under "
                                       f"{self._prefix!r}; nothing to close.")
            state, token = current
            if decode_state(state, key=backend.key).closed:
                return False
            result = await backend.set_state(encode_closed(state, key=backend.key), token)
            if result is None:
                current = None
                continue
            if result[2]:
                return True
            conflicts += 1
            if deadline.expired:
                raise EtcdConnectionError(
                    f"Closing the run {run_id!r} lost to other writers {conflicts} times "
                    f"within {deadline.seconds:g} s (read_timeout); it is not closed yet."
                )
            current = result[0], result[1]
            await asyncio.sleep(random.uniform(0, 0.02))

    async def delete_run(self, run_id: str, *, unchanged_since: int | None = None) -> int | None:
        """Delete every key of the run (state, store, native), in one transaction.

        Args:
            run_id: the run.
            unchanged_since: delete only if no key of the run was written after this
                revision (e.g. :attr:`RunInfo.last_revision` from a listing), so a run that
                came back to life meanwhile is kept.

        Returns:
            How many keys were deleted (0: there were none); None when the run changed
            after ``unchanged_since`` and nothing was deleted.

        Raises:
            EtcdConnectionError: etcd did not answer within ``read_timeout``.
        """
        keys = RunKeys(run_id, self._prefix)
        key, owned = keys.state, keys.run_prefix
        owned_end = utils.prefix_range_end(owned)
        compare = []
        if unchanged_since is not None:
            compare = [
                rpc.Compare(key=key, result=rpc.Compare.LESS, target=rpc.Compare.MOD,
                            mod_revision=unchanged_since + 1),
                rpc.Compare(key=owned, range_end=owned_end, result=rpc.Compare.LESS,
                            target=rpc.Compare.MOD, mod_revision=unchanged_since + 1),
            ]
        request = rpc.TxnRequest(compare=compare, success=[
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key)),
            rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=owned,
                                                                      range_end=owned_end)),
        ])
        response = await self._client.txn_idempotent(
            request, self._deadline(), f"Deleting the run {key.decode(errors='replace')!r}")
        if not response.succeeded:
            return None
        return sum(int(op.response_delete_range.deleted) for op in response.responses)
