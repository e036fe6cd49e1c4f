"""The compare-and-swap: one ``Txn``, and the rules that resolve an ambiguous outcome.

Every conditional write etcd_rdzv makes goes through :func:`compare_and_swap`: the backend's
``set_state`` (and so :meth:`~etcd_rdzv.admin.RendezvousAdmin.close_run`), and the store's
``compare_set``, ``add`` and ``append``. One attempt is one round trip::

    Txn(if <expectation> then Put(key, value, lease) else Range(key))

so a conflict returns the current value with no further read. An attempt whose answer is
lost (a timeout, a member lost mid-call) may or may not have been applied. It is never
resent blindly; the key is read and:

1. **the key holds exactly our value** and the value is ``tagged`` (unique to this write,
   as :class:`~etcd_rdzv.codec.StateCodec` makes it): the write landed;
2. **the expectation still holds**: it was not applied (yet), and resending is safe because
   the same compare guards the resend;
3. **the key moved on**: with a tagged value and a revision expectation, the write, had it
   landed, was the key's first change after the expected revision (for a create: the put
   that created the key as it is now); the history tells whether that change was ours.
   Without a tag nobody can tell: the outcome is ``unknown``, and the caller decides
   (``compare_set`` answers with the current value either way; ``add`` raises rather than
   risk counting twice).

All of it within the caller's :class:`~etcd_rdzv.deadline.Deadline`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

from aetcd import rpc

from ._connection import EtcdClient
from ._lease import LeaseHolder
from .deadline import Deadline
from .errors import CompactedError, EtcdConnectionError, TransientError

__all__ = ["CasResult", "Expect", "compare_and_swap", "resolve_lost_answer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expect:
    """What a key must hold for a swap to happen. Build one with the class methods."""

    kind: Literal["absent", "revision", "value"]
    revision: int = 0
    """For ``revision``: the ``mod_revision`` the key must have."""
    value: bytes = b""
    """For ``value``: the bytes the key must hold."""

    @classmethod
    def absent(cls) -> Expect:
        """The key must not exist (a create)."""
        return cls("absent")

    @classmethod
    def at_revision(cls, revision: int) -> Expect:
        """The key must have ``mod_revision == revision`` (0: must not exist)."""
        return cls("absent") if revision == 0 else cls("revision", revision=revision)

    @classmethod
    def holding(cls, value: bytes) -> Expect:
        """The key must hold exactly ``value``."""
        return cls("value", value=value)

    def compare(self, key: bytes) -> rpc.Compare:
        """The ``Txn`` compare; built fresh per call (aetcd's compares are mutable)."""
        if self.kind == "absent":
            return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE,
                               create_revision=0)
        if self.kind == "revision":
            return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD,
                               mod_revision=self.revision)
        return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE,
                           value=self.value)

    def holds(self, kv: Any | None) -> bool:
        """Whether the key as read (``kv``, None when absent) still meets the expectation."""
        if self.kind == "absent":
            return kv is None
        if self.kind == "revision":
            return kv is not None and int(kv.mod_revision) == self.revision
        return kv is not None and bytes(kv.value) == self.value


@dataclass(frozen=True)
class CasResult:
    """How a :func:`compare_and_swap` ended."""

    outcome: Literal["applied", "conflict", "unknown"]
    """``applied``: our value was written. ``conflict``: the expectation failed, nothing was
    written. ``unknown``: etcd failed mid-write and the key has moved on since; an untagged
    value cannot tell whether the write landed before that."""
    revision: int
    """``applied``: the revision of our write. Otherwise the key's ``mod_revision`` now
    (0: the key does not exist)."""
    value: bytes | None
    """``applied``: the value written. Otherwise the value the key holds now (None: absent)."""

    @property
    def applied(self) -> bool:
        return self.outcome == "applied"

    @classmethod
    def _found(cls, outcome: Literal["conflict", "unknown"], kv: Any | None) -> CasResult:
        if kv is None:
            return cls(outcome, 0, None)
        return cls(outcome, int(kv.mod_revision), bytes(kv.value))


async def compare_and_swap(
    client: EtcdClient,
    key: bytes,
    expect: Expect,
    value: bytes,
    deadline: Deadline,
    what: str,
    *,
    lease: LeaseHolder | int | None = None,
    tagged: bool = False,
) -> CasResult:
    """Write ``value`` to ``key`` if ``expect`` holds; see the module docstring for the rules.

    Args:
        client: the connection.
        key: the key.
        expect: what the key must hold.
        value: the new value.
        deadline: bounds every attempt and every read that resolves one.
        what: the operation, as messages name it ("Writing the rendezvous state '/k'").
        lease: attached to the write: a lease id, or a
            :class:`~etcd_rdzv._lease.LeaseHolder` (a lease etcd lost is then replaced and
            the write resent: a write naming a missing lease is never applied). None: none.
        tagged: ``value`` is unique to this write, so finding it in the key proves the write
            landed. Only then can a lost answer be resolved after the key moved on.

    Raises:
        TransientError: etcd did not confirm the write within ``deadline`` while the key
            stayed as expected (not applied), or the history needed to resolve a tagged
            write could not be read within it (unknown outcome).
        EtcdConnectionError: a permanent error (auth, TLS), at once; or the history needed
            to resolve a tagged write is compacted (unknown outcome, for good).
    """
    while True:
        if deadline.expired:
            raise TransientError(
                f"{what} did not complete within {deadline.seconds:g} s (read_timeout) at "
                f"{client.config.targets}; the last read showed it not applied."
            )
        try:
            response = await _attempt(client, key, expect, value, deadline, what, lease)
        except TransientError as exc:
            log.info("%s: outcome unknown (%s); reading to resolve it", what, exc)
            resolved = await resolve_lost_answer(client, key, expect, value, deadline, what,
                                                 tagged=tagged)
            if resolved is None:
                continue  # not applied (yet): the compare still guards a resend
            return resolved
        if response.succeeded:
            return CasResult("applied", int(response.header.revision), value)
        kvs = response.responses[0].response_range.kvs
        kv = kvs[0] if kvs else None
        if tagged and kv is not None and bytes(kv.value) == value:
            # An earlier attempt of this very write landed (the tag makes it ours).
            return CasResult("applied", int(kv.mod_revision), value)
        return CasResult._found("conflict", kv)


async def resolve_lost_answer(client: EtcdClient, key: bytes, expect: Expect, value: bytes,
                              deadline: Deadline, what: str, *,
                              tagged: bool = False) -> CasResult | None:
    """How a write whose answer was lost ended, by rules 1 to 3 of the module docstring.

    Returns None when it was not applied and ``expect`` still holds (resending is safe).

    Raises:
        TransientError: the key, or the history needed to resolve a tagged write, could
            not be read within ``deadline``.
        EtcdConnectionError: that history is compacted: the outcome cannot be known.
    """
    read = await client.get(key, deadline)
    kv = read.kvs[0] if read.kvs else None
    if tagged and kv is not None and bytes(kv.value) == value:
        return CasResult("applied", int(kv.mod_revision), value)
    if expect.holds(kv):
        return None
    if not tagged or expect.kind == "value":
        return CasResult._found("unknown", kv)
    # Our write, had it landed, was the key's first change after the expected revision
    # (for a create: the put that created the key as it is now).
    first = expect.revision + 1 if expect.kind == "revision" else \
        int(kv.create_revision) if kv is not None else 0
    landed_at = await _first_change_if(client, key, first, value, deadline, what) \
        if first else None
    if landed_at is not None:
        return CasResult("applied", landed_at, value)
    return CasResult._found("conflict", kv)


async def _attempt(client: EtcdClient, key: bytes, expect: Expect, value: bytes,
                   deadline: Deadline, what: str,
                   lease: LeaseHolder | int | None) -> rpc.TxnResponse:
    def request(lease_id: int) -> rpc.TxnRequest:
        return rpc.TxnRequest(
            compare=[expect.compare(key)],
            success=[rpc.RequestOp(
                request_put=rpc.PutRequest(key=key, value=value, lease=lease_id))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )

    if lease is None or isinstance(lease, int):
        return await client.txn_once(request(lease or 0), deadline, what)
    return await lease.write(
        lambda lease_id: client.txn_once(request(lease_id), deadline, what), deadline)


async def _first_change_if(client: EtcdClient, key: bytes, start_revision: int, value: bytes,
                           deadline: Deadline, what: str) -> int | None:
    """The revision of the key's first change from ``start_revision`` if it wrote ``value``,
    else None.

    The key changed after ``start_revision`` (the caller read it), so the change exists:
    waiting for it only waits out etcd's transient failures.

    Raises:
        EtcdConnectionError: that history is compacted: the write's outcome cannot be known.
        TransientError: that history could not be read within ``deadline``; it may be once
            etcd answers again.
    """
    unknown = f"{what} has an unknown outcome: etcd failed during the write and the key " \
              "has changed since"
    try:
        async with contextlib.aclosing(client.follow(key, start_revision)) as events:
            event = await asyncio.wait_for(anext(events), max(0.001, deadline.remaining()))
    except CompactedError as exc:
        raise EtcdConnectionError(f"{unknown}, and etcd has compacted that history.") from exc
    except asyncio.TimeoutError as exc:
        raise TransientError(f"{unknown}, and its history could not be read within "
                             f"{deadline.seconds:g} s (read_timeout) at "
                             f"{client.config.targets}.") from exc
    return event.revision if event.value == value else None
