"""The one module that talks to etcd: channel, deadlines, retries and error mapping.

Only this module opens channels, sends RPCs and sees grpc. etcd's request and response
messages are protobufs from ``aetcd.rpc``: the modules that shape requests build them
(:mod:`~etcd_rdzv.cas`, :mod:`~etcd_rdzv.store`, :mod:`~etcd_rdzv.admin`) and read the
responses this module returns; none of them sends anything itself. The policy it owns:

* **Channel.** Plaintext or TLS/mTLS (``grpc.aio.secure_channel``); several endpoints
  through one gRPC multi-address target (``ipv4:a:p,b:p``, pick_first fails over); reconnect
  backoff capped at 1 s (gRPC's default left clients failing ~11 s after an outage ended).
* **Deadlines.** Every RPC carries one: ``request_timeout`` for an attempt, capped by what
  is left of the operation's :class:`Deadline` (``read_timeout``).
* **Retries.** Explicit per call (:meth:`EtcdClient._unary`'s ``idempotent``): reads and
  writes that are safe to repeat retry transient errors (UNAVAILABLE, DEADLINE_EXCEEDED,
  no leader) until the deadline, then raise :class:`UnavailableError`, a
  :class:`TransientError`. A compare-and-swap is attempted once:
  :meth:`EtcdClient.txn_once` raises :class:`UnavailableError` and :mod:`etcd_rdzv.cas`
  resolves it by reading. Permanent errors (auth, TLS, a lost lease, no space) are never
  retried: they raise at once whatever deadline is left.
* **Watches.** :meth:`EtcdClient.follow` is the one resumable watch: every change from a
  revision on, in order, resumed after a break from the revision after the last change
  seen, for as long as its caller iterates; compaction raises :class:`CompactedError`.
  :meth:`EtcdClient.watch` is the single stream under it.
* **Re-login.** An expired auth token (UNAUTHENTICATED) reconnects, which authenticates
  again, and repeats the attempt once: a rejected request was never applied.
* **Errors.** gRPC status codes become :mod:`etcd_rdzv.errors` in one function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import operator
import os
import random
import socket
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from .config import Endpoint, EtcdConfig
from .deadline import Deadline
from .errors import (
    CompactedError,
    EtcdAuthError,
    EtcdConnectionError,
    EtcdRendezvousError,
    EtcdTLSError,
    LeaseNotFoundError,
    TransientError,
    UnavailableError,
)

__all__ = ["UNTIL_CANCELLED", "EtcdClient", "LeaseStatus", "MemberStatus", "WatchEvent"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Pings only while calls are open (a watch): a hung member is noticed within ~15 s.
    # etcd's default --grpc-keepalive-min-time is 5 s; faster pings get the stream closed.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)
#: The process whose gRPC asyncio stack is initialised (a channel was opened), if any.
_grpc_process: int | None = None
#: Clients a forked child inherited. Kept alive on purpose: freeing a gRPC channel shuts
#: down its connection, which the child shares with the parent.
_inherited_clients: list[object] = []

#: CANCELLED arrives when a channel is closed under a call (a failover reconnect).
_TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED})
#: etcd server errors that pass, whatever status code carries them (a leader election, a
#: server-side timeout while the cluster is busy), and gRPC core's INTERNAL for a stream
#: broken on this side (a channel closed under a lease keep-alive stream by a reconnect to
#: the next endpoint: seen in the fault soak).
_TRANSIENT_DETAILS = ("context deadline exceeded", "request timed out", "leader changed",
                      "no leader", "too many requests", "Internal error from Core")
#: The pause between attempts of a unary call, seconds, doubling from the first to the
#: second (with jitter). Short: a call has only its deadline (read_timeout) to succeed, and
#: a failover or a leader election usually ends within a second.
_RETRY_BACKOFF_INITIAL = 0.05
_RETRY_BACKOFF_MAX = 0.5
#: The pause between reopenings of a broken watch (:meth:`EtcdClient.follow`), seconds,
#: doubling from the first to the second (with jitter). Longer than a call's: a follow has
#: no deadline and may wait out an outage of hours; every node of a run follows keys, and
#: a few thousand followers reconnecting more often than every 2 s would load a cluster
#: that is just coming back. Short at first, so a failover costs a watch ~0.1 s.
_FOLLOW_BACKOFF_INITIAL = 0.1
_FOLLOW_BACKOFF_MAX = 2.0
#: What a stream's read() returns at its end (grpc-stubs does not declare it).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
#: How long closing waits for a cancelled stream's reader to end, seconds.
_CLOSE_WAIT = 1.0

#: The deadline of a call that retries transient failures for as long as its caller waits:
#: the caller bounds it by cancelling (a read that starts or restarts a follow). Permanent
#: errors still raise at once.
UNTIL_CANCELLED = Deadline(math.inf, math.inf)


def _task_cancelling() -> bool:
    """Whether the running task is being cancelled (known from Python 3.11 on)."""
    if sys.version_info >= (3, 11):
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
    return False


@dataclass(frozen=True)
class WatchEvent:
    """One change of a key, as :meth:`EtcdClient.follow` and :meth:`EtcdClient.watch` report
    it."""

    revision: int
    """The revision of the change: a put's ``mod_revision``, or the revision of a delete."""
    value: bytes | None
    """The new value; None when the key was deleted."""
    lease: int = 0
    """The lease the new value carries (0: none)."""
    key: bytes = b""
    """The key that changed (for a watch over a range of keys)."""
    create_revision: int = 0
    """For a put: the revision at which the key was created (0 for a delete)."""



def _tls_failure(details: str, config: EtcdConfig, answered: bool) -> str | None:
    """Why a connection failed for good, if its details show a TLS misconfiguration."""
    if "CERTIFICATE_VERIFY_FAILED" in details or "certificate verify failed" in details:
        return (f"the server's certificate is not signed by ca_cert={_path(config.ca_cert)} "
                "(or by the system's CAs when ca_cert is unset)")
    if "Peer name" in details and "not in peer certificate" in details:
        return ("the server's certificate does not name the host in the endpoint; use the "
                "name or address its certificate lists")
    if "ALERT_BAD_CERTIFICATE" in details or "ALERT_CERTIFICATE_REQUIRED" in details \
            or "ALERT_UNKNOWN_CA" in details:
        given = f"ssl_cert={_path(config.ssl_cert)}" if config.ssl_cert else "no ssl_cert"
        return (f"the server refused the client certificate ({given}): it requires one "
                "signed by a CA it trusts (--client-cert-auth)")
    if "WRONG_VERSION_NUMBER" in details or ("handshake" in details.lower()
                                              and config.uses_tls and not answered):
        return "the TLS handshake failed: does etcd serve TLS on this port?"
    if not config.uses_tls and not answered and "Socket closed" in details:
        return ("the server closed the connection without answering: if etcd serves TLS, "
                "set protocol=https and ca_cert")
    return None


def _path(path: os.PathLike[str] | None) -> str:
    return repr(os.fspath(path)) if path is not None else "None"


def _permission_denied(what: str, config: EtcdConfig, access: str, details: str) -> str:
    return (f"{what} failed: permission denied. The etcd user {config.username!r} needs "
            f"{access} access to that key's prefix ({details}).")


def _map_grpc_error(exc: grpc.aio.AioRpcError, what: str, config: EtcdConfig,
                    answered: bool = True) -> EtcdRendezvousError:
    """Turn a gRPC status into this project's error, naming what failed and where.

    ``answered`` says whether etcd ever answered this client: a TLS-looking failure on a
    client that never got through is a configuration error and fails at once.
    """
    code, details, targets = exc.code(), exc.details() or "", config.targets
    if code in _TRANSIENT_CODES or any(text in details for text in _TRANSIENT_DETAILS):
        reason = _tls_failure(details, config, answered)
        if reason is not None:
            return EtcdTLSError(f"{what} failed: cannot connect to etcd at {targets}: "
                                f"{reason} ({details}).")
        return UnavailableError(f"{what} failed: etcd at {targets} is unavailable "
                                f"({code.name}: {details}).")
    if code == grpc.StatusCode.UNAUTHENTICATED or "authentication failed" in details:
        return EtcdAuthError(f"{what} failed: etcd at {targets} rejected the credentials of "
                             f"user {config.username!r} ({details}). Check username and "
                             "password_file.")
    if code == grpc.StatusCode.PERMISSION_DENIED or "permission denied" in details:
        return EtcdAuthError(_permission_denied(what, config, "read-write", details))
    if "required revision has been compacted" in details:
        # A read at a past revision, or a compaction to it, that etcd has compacted away.
        return CompactedError(f"{what} failed: etcd has compacted that revision away "
                              f"({details}).", 0)
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFoundError(f"{what} failed: {details}.")
    if "database space exceeded" in details:
        return EtcdConnectionError(
            f"{what} failed: etcd at {targets} is out of space (NOSPACE alarm: {details}). "
            "Compact and defragment etcd, then disarm the alarm; run etcd with "
            "--auto-compaction-retention to keep it from happening again."
        )
    return EtcdConnectionError(f"{what} failed: etcd at {targets} answered {code.name}: "
                               f"{details}")


#: The unary RPCs this module sends, each named by the stub method that serves it.
_RANGE = operator.attrgetter("kv.Range")
_TXN = operator.attrgetter("kv.Txn")
_PUT = operator.attrgetter("kv.Put")
_DELETE = operator.attrgetter("kv.DeleteRange")
_COMPACT = operator.attrgetter("kv.Compact")
_GRANT = operator.attrgetter("lease.LeaseGrant")
_REVOKE = operator.attrgetter("lease.LeaseRevoke")
_TIME_TO_LIVE = operator.attrgetter("lease.LeaseTimeToLive")
_STATUS = operator.attrgetter("maintenance.Status")
_ALARM = operator.attrgetter("maintenance.Alarm")


def _show(key: bytes) -> str:
    """A key as messages quote it."""
    return repr(key.decode(errors="replace"))


@dataclass(frozen=True)
class LeaseStatus:
    """A lease as etcd reports it."""

    ttl: int
    """Seconds left; -1 when the lease has expired or never existed."""
    granted_ttl: int
    """The TTL it was granted with (0 when it is gone)."""


@dataclass(frozen=True)
class MemberStatus:
    """What :meth:`EtcdClient.status` reports of the member it asked."""

    db_size: int
    """The backend database's size on disk, in bytes (what etcd's quota counts)."""
    db_size_in_use: int
    """The part of it in use; the rest is reclaimed by a defragmentation."""
    is_leader: bool
    """Whether this member is the cluster's leader."""


@dataclass(frozen=True)
class _Session:
    """One open channel to etcd with the stubs this module calls and the auth token."""

    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...] | None
    kv: rpc.KVStub
    lease: rpc.LeaseStub
    maintenance: rpc.MaintenanceStub
    keep_alives: _KeepAliveStream

    @classmethod
    async def open(cls, config: EtcdConfig, target: str, extra_options: dict[str, Any]) -> _Session:
        """Open the channel (TLS, several endpoints, capped backoff) and log in if asked."""
        options = list({**dict(_CHANNEL_OPTIONS), **extra_options}.items())
        if config.uses_tls:
            channel = grpc.aio.secure_channel(target, _tls_credentials(config), options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        metadata = None
        if config.username is not None:
            try:
                response = await rpc.AuthStub(channel).Authenticate(
                    rpc.AuthenticateRequest(name=config.username, password=config.password),
                    timeout=config.request_timeout,
                )
            except BaseException:
                await channel.close(None)
                raise
            metadata = (("token", response.token),)
        lease = rpc.LeaseStub(channel)
        return cls(channel, metadata, rpc.KVStub(channel), lease, rpc.MaintenanceStub(channel),
                   _KeepAliveStream(lease, metadata))

    async def close(self) -> None:
        await self.keep_alives.close()
        await self.channel.close(None)


class _KeepAliveStream:
    """Lease keep-alives for every lease of one session, over one bidirectional stream.

    A keep-alive creates no revision in etcd (it does not go through raft), so renewing
    many leases costs etcd little; one stream per session, not per lease or per call,
    keeps the cost on the client small too. Each :meth:`renew` writes one request and
    waits for the answer naming its lease.
    """

    def __init__(self, stub: rpc.LeaseStub, metadata: tuple[tuple[str, str], ...] | None) -> None:
        self._stub = stub
        self._metadata = metadata
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        #: A gRPC stream takes one write at a time.
        self._write_lock = asyncio.Lock()

    async def renew(self, lease_id: int, timeout: float) -> int:
        """Renew ``lease_id``; return its TTL after renewal (0 when etcd no longer has it)."""
        if self._stream is None:
            self._stream = self._stub.LeaseKeepAlive(metadata=self._metadata)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._stream))
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, []).append(answer)
        try:
            async with self._write_lock:
                await self._stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation
            # that arrives as the answer does, and the caller's loop would never stop.
            await asyncio.wait({answer}, timeout=timeout)
            if not answer.done():
                raise UnavailableError(f"Renewing lease {lease_id:x} failed: no answer within "
                                       f"{timeout:g} s.")
            return answer.result()
        finally:
            waiting = self._waiters.get(lease_id, [])
            if answer in waiting:
                waiting.remove(answer)

    async def _read(self, stream: Any) -> None:
        error: BaseException
        try:
            while True:
                response = await stream.read()
                if response is _EOF:
                    error = UnavailableError("etcd ended the lease keep-alive stream.")
                    break
                for answer in self._waiters.pop(int(response.ID), []):
                    if not answer.done():
                        answer.set_result(int(response.TTL))
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            error = exc
        if self._stream is stream:
            self._stream = None
        waiters, self._waiters = self._waiters, {}
        if isinstance(error, asyncio.CancelledError):
            # The stream was closed (a reconnect): the renewals waiting on it failed, they
            # were not cancelled; their callers retry on the next channel.
            error = UnavailableError("The lease keep-alive stream was closed (reconnecting).")
        for answers in waiters.values():
            for answer in answers:
                if not answer.done():
                    answer.set_exception(error)

    async def close(self) -> None:
        """End the stream and wait for its reader: no call may outlive the event loop."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            # Bounded: a read gRPC never completes must not hang the close.
            await asyncio.wait({reader}, timeout=_CLOSE_WAIT)


def _tls_credentials(config: EtcdConfig) -> grpc.ChannelCredentials:
    def read(path: os.PathLike[str] | None, name: str) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            raise EtcdTLSError(f"Cannot read {name}={os.fspath(path)!r}: {exc}") from exc

    cert = read(config.ssl_cert, "ssl_cert")
    key = read(config.ssl_cert_key, "ssl_cert_key") if config.ssl_cert_key else cert
    return grpc.ssl_channel_credentials(
        root_certificates=read(config.ca_cert, "ca_cert"),
        private_key=key if cert else None,
        certificate_chain=cert,
    )


async def _resolve_target(endpoints: tuple[Endpoint, ...]) -> tuple[str, dict[str, Any]]:
    """The gRPC target for the endpoints, and the channel options it needs.

    One endpoint is passed as it is (gRPC resolves the name). Several are resolved here into
    one ``ipv4:``/``ipv6:`` address list, which pick_first walks until one answers.
    """
    if len(endpoints) == 1:
        return str(endpoints[0]), {}
    loop = asyncio.get_running_loop()
    addresses: list[tuple[int, str, int]] = []
    for endpoint in endpoints:
        try:
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("etcd endpoint %s does not resolve (%s); skipping it", endpoint, exc)
            continue
        for family, _, _, _, sockaddr in infos:
            entry = (int(family), str(sockaddr[0]), endpoint.port)
            if entry not in addresses:
                addresses.append(entry)
    if not addresses:
        raise UnavailableError("None of the etcd endpoints "
                          f"{','.join(map(str, endpoints))} resolves to an address.")
    families = {family for family, _, _ in addresses}
    if families == {int(socket.AF_INET)}:
        target = "ipv4:" + ",".join(f"{host}:{port}" for _, host, port in addresses)
    elif families == {int(socket.AF_INET6)}:
        target = "ipv6:" + ",".join(f"[{host}]:{port}" for _, host, port in addresses)
    else:
        # gRPC's address-list targets take one family; keep the one the first endpoint used.
        first = addresses[0][0]
        log.warning("etcd endpoints %s mix IPv4 and IPv6; using only the addresses of the "
                    "first endpoint's family", ",".join(map(str, endpoints)))
        scheme = "ipv4:" if first == int(socket.AF_INET) else "ipv6:"
        fmt = "{}:{}" if first == int(socket.AF_INET) else "[{}]:{}"
        target = scheme + ",".join(fmt.format(h, p) for f, h, p in addresses if f == first)
    # TLS checks one server name for the whole list: the first endpoint's.
    return target, {"grpc.ssl_target_name_override": endpoints[0].host}


class EtcdClient:
    """A connection to one etcd cluster, shared by the backend and the store of a process.

    It connects lazily, on the event loop of its first call, and serves that loop only.
    A child forked after the parent used etcd never touches the parent's channel (freeing it
    would shut down the connection the parent shares); connecting there raises
    :class:`EtcdConnectionError`, since gRPC's asyncio stack does not survive ``fork``.

    Args:
        config: endpoints, security and deadlines.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self._config = config
        self._client: _Session | None = None
        self._pid = os.getpid()
        self._connect_lock: asyncio.Lock | None = None
        #: Whether etcd has answered this client yet; see _map_grpc_error.
        self._answered = False
        #: How many times a hung member made the client move on to the next endpoint.
        self._rotation = 0

    @property
    def config(self) -> EtcdConfig:
        return self._config

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel. The client reconnects if it is used again."""
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            await client.close()

    async def _connected(self) -> _Session:
        global _grpc_process
        if self._pid != os.getpid():
            # A forked child: the parent's channel and loop are not ours to use or close.
            _inherited_clients.append(self._client)
            self._pid, self._client, self._connect_lock = os.getpid(), None, None
        if self._client is not None:
            return self._client
        if _grpc_process not in (None, os.getpid()):
            # gRPC's asyncio stack does not survive fork: in the child its poller thread is
            # gone, calls never complete, and the shared descriptors stall the parent too.
            raise EtcdConnectionError(
                "etcd_rdzv cannot connect from a process forked after its parent used etcd: "
                "gRPC's asyncio stack does not survive fork(). Start such processes with the "
                "'spawn' or 'forkserver' multiprocessing method (torchrun's default is spawn)."
            )
        _grpc_process = os.getpid()
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._client is None:
                # Start the list at the member after the one that last hung (see _attempt).
                shift = self._rotation % len(self._config.endpoints)
                endpoints = self._config.endpoints[shift:] + self._config.endpoints[:shift]
                target, options = await _resolve_target(endpoints)
                self._client = await _Session.open(self._config, target, options)
            return self._client

    async def _reconnect(self, stale: _Session) -> None:
        if self._client is stale:
            self._client = None
            await stale.close()

    async def _attempt(
        self, what: str, call: Callable[[_Session, float], Awaitable[T]], deadline: Deadline
    ) -> T:
        """One RPC attempt with its deadline; once more after a re-login."""
        for relogin in (False, True):
            client: _Session | None = None
            try:
                client = await self._connected()
                result = await call(client, deadline.attempt_timeout(self._config.request_timeout))
                self._answered = True
                return result
            except asyncio.CancelledError:
                if _task_cancelling() or client is None or self._client is client:
                    raise
                # Another call reconnected and closed the channel under this one: the call
                # broke (it may have been applied), this task was not cancelled.
                raise UnavailableError(f"{what} failed: the channel to etcd at "
                                       f"{self._config.targets} was closed (reconnecting)."
                                       ) from None
            except grpc.aio.AioRpcError as exc:
                if (exc.code() == grpc.StatusCode.UNAUTHENTICATED and not relogin
                        and self._config.username is not None and client is not None):
                    log.info("etcd auth token expired; authenticating again")
                    await self._reconnect(client)
                    continue
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and client is not None:
                    await self._move_on_from(client)
                raise _map_grpc_error(exc, what, self._config, self._answered) from exc
        raise AssertionError("unreachable")

    async def _move_on_from(self, silent: _Session) -> None:
        """A member took a call and did not answer in time. pick_first stays on a member that
        accepts connections but never answers (paused, overloaded): with several endpoints,
        reconnect starting from the next one."""
        if len(self._config.endpoints) > 1 and self._client is silent:
            self._rotation += 1
            log.info("etcd member did not answer in time; moving to the next endpoint")
            await self._reconnect(silent)

    async def _retrying(
        self, what: str, call: Callable[[_Session, float], Awaitable[T]], deadline: Deadline
    ) -> T:
        """Attempts of an idempotent call until one succeeds or the deadline passes; a
        permanent error (not a :class:`TransientError`) raises at once."""
        backoff = _RETRY_BACKOFF_INITIAL
        while True:
            try:
                return await self._attempt(what, call, deadline)
            except TransientError as exc:
                if deadline.remaining() <= backoff:
                    raise UnavailableError(
                        f"{exc} Gave up after {deadline.seconds:g} s."
                    ) from exc.__cause__
                log.debug("retrying %s: %s", what, exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, _RETRY_BACKOFF_MAX)

    async def _unary(self, what: str, method: Callable[[_Session], Any], request: Any,
                     deadline: Deadline, *, idempotent: bool) -> Any:
        """One unary RPC under this module's policy: ``request`` sent to ``method`` of the
        session's stubs, each attempt bounded by ``request_timeout`` and ``deadline``.

        ``idempotent`` calls are retried on transient errors until ``deadline``; the others
        get one attempt (plus one after a re-login, which etcd rejected before applying).
        """
        async def call(session: _Session, timeout: float) -> Any:
            return await method(session)(request, timeout=timeout, metadata=session.metadata)

        if idempotent:
            return await self._retrying(what, call, deadline)
        return await self._attempt(what, call, deadline)

    async def get(self, key: bytes, deadline: Deadline) -> rpc.RangeResponse:
        """A linearizable read of one key, retried within ``deadline``."""
        return await self._unary(f"Reading {_show(key)}", _RANGE, rpc.RangeRequest(key=key),
                                 deadline, idempotent=True)

    async def get_prefix(self, prefix: bytes, deadline: Deadline, *, count_only: bool = False,
                         keys_only: bool = False) -> rpc.RangeResponse:
        """A linearizable read of every key under ``prefix``, retried within ``deadline``."""
        request = rpc.RangeRequest(key=prefix, range_end=aetcd.utils.prefix_range_end(prefix),
                                   count_only=count_only, keys_only=keys_only)
        return await self._unary(f"Reading prefix {_show(prefix)}", _RANGE, request, deadline,
                                 idempotent=True)

    async def range(self, request: rpc.RangeRequest, deadline: Deadline,
                    what: str) -> rpc.RangeResponse:
        """A read shaped by the caller (a key range, ``count_only``, ``max_create_revision``,
        a past ``revision``, a sort order, a limit), retried within ``deadline``."""
        return await self._unary(what, _RANGE, request, deadline, idempotent=True)

    async def keep_alive(self, lease_id: int, deadline: Deadline) -> int:
        """Renew a lease once; return its TTL after renewal, 0 when etcd no longer has it.

        Retried within ``deadline``: renewing twice is harmless. It writes no revision.
        """
        async def call(session: _Session, timeout: float) -> int:
            try:
                return await session.keep_alives.renew(lease_id, timeout)
            except UnavailableError:
                # Unanswered renewals must not stay on a hung member until the lease runs out.
                await self._move_on_from(session)
                raise

        return await self._retrying(f"Renewing lease {lease_id:x}", call, deadline)

    async def txn_once(self, request: rpc.TxnRequest, deadline: Deadline,
                       what: str) -> rpc.TxnResponse:
        """One attempt of a transaction.

        Raises:
            UnavailableError: the outcome is unknown; resolve it by reading, never by resending.
        """
        return await self._unary(what, _TXN, request, deadline, idempotent=False)

    async def txn_idempotent(self, request: rpc.TxnRequest, deadline: Deadline,
                             what: str) -> rpc.TxnResponse:
        """A transaction that is safe to apply twice (reads, or writes a compare guards)."""
        return await self._unary(what, _TXN, request, deadline, idempotent=True)

    async def put(self, key: bytes, value: bytes, lease_id: int, deadline: Deadline) -> int:
        """Write ``key`` (last writer wins) and return the new revision; retried.

        A resend after a lost answer writes the same value again, which is harmless for a
        last-writer-wins key. Not for compare-and-swap: see :mod:`etcd_rdzv.cas`.
        """
        response = await self._unary(f"Writing {_show(key)}", _PUT,
                                     rpc.PutRequest(key=key, value=value, lease=lease_id),
                                     deadline, idempotent=True)
        return int(response.header.revision)

    async def delete(self, key: bytes, deadline: Deadline, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it) and return how many keys went; retried."""
        request = rpc.DeleteRangeRequest(
            key=key, range_end=aetcd.utils.prefix_range_end(key) if prefix else b"")
        response = await self._unary(f"Deleting {_show(key)}", _DELETE, request, deadline,
                                     idempotent=True)
        return int(response.deleted)

    async def grant_lease(self, ttl: int, deadline: Deadline) -> int:
        """Grant a lease of ``ttl`` seconds and return its id.

        Retried: a grant whose answer was lost leaves an unused lease that expires by itself.
        """
        response = await self._unary("Granting a lease", _GRANT, rpc.LeaseGrantRequest(TTL=ttl),
                                     deadline, idempotent=True)
        return int(response.ID)

    async def revoke_lease(self, lease_id: int, deadline: Deadline) -> bool:
        """Revoke a lease, deleting its keys at once; False when etcd no longer had it.

        Retried: revoking twice is revoking once.
        """
        try:
            await self._unary("Revoking a lease", _REVOKE, rpc.LeaseRevokeRequest(ID=lease_id),
                              deadline, idempotent=True)
        except LeaseNotFoundError:
            return False
        return True

    async def lease_status(self, lease_id: int, deadline: Deadline) -> LeaseStatus:
        """How long a lease has left, and how long it was granted for; retried."""
        response = await self._unary("Reading a lease", _TIME_TO_LIVE,
                                     rpc.LeaseTimeToLiveRequest(ID=lease_id), deadline,
                                     idempotent=True)
        return LeaseStatus(int(response.TTL), int(response.grantedTTL))

    async def compact(self, revision: int, deadline: Deadline) -> bool:
        """Compact etcd's history up to ``revision`` (the whole keyspace, not one prefix).

        Returns False when that revision was already compacted (by anyone); retried.
        """
        try:
            await self._unary(f"Compacting to revision {revision}", _COMPACT,
                              rpc.CompactionRequest(revision=revision, physical=False),
                              deadline, idempotent=True)
        except CompactedError:
            return False
        return True

    async def alarms(self, deadline: Deadline) -> list[str]:
        """The alarms raised in the cluster (``NOSPACE``, ``CORRUPT``), one per member and
        kind; empty when none is; retried."""
        response = await self._unary("Reading etcd's alarms", _ALARM,
                                     rpc.AlarmRequest(action=rpc.AlarmRequest.GET), deadline,
                                     idempotent=True)
        return [rpc.AlarmType.Name(alarm.alarm) for alarm in response.alarms]

    async def status(self, deadline: Deadline) -> MemberStatus:
        """The status of the member this client talks to (database size, leader)."""
        response = await self._unary("Reading etcd's status", _STATUS, rpc.StatusRequest(),
                                     deadline, idempotent=True)
        return MemberStatus(int(response.dbSize), int(response.dbSizeInUse),
                            int(response.leader) == int(response.header.member_id))

    async def watch(self, key: bytes, start_revision: int, deadline: Deadline, *,
                    range_end: bytes = b"") -> AsyncGenerator[WatchEvent, None]:
        """The changes of ``key`` (of every key in ``[key, range_end)`` when ``range_end``
        is given) from ``start_revision`` on, for as long as one stream lasts.

        The raw primitive under :meth:`follow`, which is what a caller that must not miss
        a change wants. The watch has a gRPC stream of its own, meant to stay open. Opening
        it (connecting, etcd confirming the watch) is retried within ``deadline``; after
        that the stream has no deadline: it yields each change as etcd reports it, and a
        stalled connection is noticed by the channel's keepalive pings.

        Raises:
            UnavailableError: the watch could not be opened within ``deadline``, or the
                stream broke or ended; resume from the last revision seen + 1.
            CompactedError: etcd no longer has ``start_revision``; read the key instead.
            EtcdAuthError: the credentials or the permissions were refused.
            EtcdTLSError: the TLS setup cannot work.
        """
        async with contextlib.aclosing(self._watch_stream(
                key, start_revision, range_end, lambda what, opener: self._retrying(
                    what, opener, deadline))) as events:
            async for event in events:
                yield event

    async def follow(self, key: bytes, from_revision: int, *,
                     range_end: bytes = b"") -> AsyncGenerator[WatchEvent, None]:
        """Every change of ``key`` (of every key in ``[key, range_end)`` when ``range_end``
        is given) from ``from_revision`` on, in order, each once, for as long as the caller
        iterates.

        The one resumable watch of this project. When the stream breaks (a member stops, a
        failover, a reconnect, etcd ends the stream) it is opened again from the revision
        after the last change yielded: the changes of one revision arrive in one response,
        so a break never falls between them. Transient failures are retried without end,
        pausing :data:`_FOLLOW_BACKOFF_INITIAL` doubling to :data:`_FOLLOW_BACKOFF_MAX`
        seconds (with jitter) between attempts; the pause starts over once a change
        arrives. The caller bounds the wait itself (a timeout, cancelling its task, or
        leaving the loop).

        To mirror keys: read them at revision R (one range read, or a Txn of reads), follow
        from R + 1 and apply each change; on :class:`CompactedError`, read afresh and follow
        from the new read's revision + 1. For such a read to outlast an outage as the
        follow does, give it :data:`UNTIL_CANCELLED` as its deadline.

        Raises:
            CompactedError: etcd has compacted the revision the follow needs (``from_revision``
                or the one after the last change yielded); its ``compact_revision`` is the
                oldest etcd still has.
            EtcdAuthError: the credentials or the read permission on the range were
                refused; at once, not retried.
            EtcdTLSError: the TLS setup cannot work; at once.
            EtcdConnectionError: another permanent failure (etcd canceled the watch for a
                reason that does not pass, etcd out of space); at once.
        """
        revision = from_revision
        backoff = _FOLLOW_BACKOFF_INITIAL
        while True:
            try:
                # One attempt per opening: the pause between openings is this loop's alone.
                async with contextlib.aclosing(self._watch_stream(
                        key, revision, range_end,
                        lambda what, opener: self._attempt(
                            what, opener, Deadline.after(self._config.request_timeout)),
                )) as events:
                    async for event in events:
                        revision = event.revision + 1
                        backoff = _FOLLOW_BACKOFF_INITIAL
                        yield event
            except TransientError as exc:
                # Said once per outage; its retries every few seconds only at debug level.
                log.log(logging.INFO if backoff == _FOLLOW_BACKOFF_INITIAL else logging.DEBUG,
                        "following %s: %s Resuming from revision %d.", _show(key), exc,
                        revision)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, _FOLLOW_BACKOFF_MAX)

    async def _watch_stream(
        self, key: bytes, start_revision: int, range_end: bytes,
        open_with: Callable[[str, Callable[[_Session, float], Awaitable[Any]]], Awaitable[Any]],
    ) -> AsyncGenerator[WatchEvent, None]:
        """One watch stream: opened through ``open_with`` (retrying or a single attempt),
        then its changes until it breaks."""
        what = f"Watching {_show(key)}"
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision))

        async def open_stream(client: _Session, timeout: float) -> Any:
            stream = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
            try:
                await stream.write(create)
                try:
                    response = await asyncio.wait_for(stream.read(), timeout)
                except asyncio.TimeoutError:
                    raise UnavailableError(f"{what} failed: etcd at {self._config.targets} did "
                                           f"not confirm the watch within {timeout:g} s.") from None
                if response is _EOF:
                    raise UnavailableError(f"{what} failed: etcd at {self._config.targets} "
                                           "closed the watch stream.")
                self._check_watch_response(response, what)
            except BaseException:
                stream.cancel()
                raise
            return stream

        stream = await open_with(what, open_stream)
        try:
            while True:
                try:
                    response = await stream.read()
                except grpc.aio.AioRpcError as exc:
                    raise _map_grpc_error(exc, what, self._config, self._answered) from exc
                except asyncio.CancelledError:
                    if not stream.cancelled() or _task_cancelling():
                        raise
                    # The channel was closed under the stream (another call reconnected):
                    # the stream broke, this task was not cancelled.
                    raise UnavailableError(f"{what} failed: the channel to etcd at "
                                           f"{self._config.targets} was closed (reconnecting)."
                                           ) from None
                if response is _EOF:
                    raise UnavailableError(f"{what} failed: etcd at {self._config.targets} "
                                           "ended the watch stream.")
                self._check_watch_response(response, what)
                for event in response.events:
                    kv = event.kv
                    if event.type == rpc.Event.DELETE:
                        yield WatchEvent(int(kv.mod_revision), None, key=bytes(kv.key))
                    else:
                        yield WatchEvent(int(kv.mod_revision), bytes(kv.value), int(kv.lease),
                                         bytes(kv.key), int(kv.create_revision))
        finally:
            stream.cancel()

    def _check_watch_response(self, response: rpc.WatchResponse, what: str) -> None:
        """Raise if a watch response says the watch cannot go on."""
        if response.compact_revision:
            raise CompactedError(f"{what} failed: etcd has compacted its history up to revision "
                                 f"{response.compact_revision}.", int(response.compact_revision))
        if response.canceled:
            reason = response.cancel_reason or "no reason given"
            if "permission denied" in reason:
                raise EtcdAuthError(_permission_denied(what, self._config, "read", reason))
            if any(text in reason for text in _TRANSIENT_DETAILS):
                raise UnavailableError(f"{what} failed: etcd at {self._config.targets} canceled "
                                       f"the watch ({reason}).")
            raise EtcdConnectionError(f"{what} failed: etcd at {self._config.targets} canceled "
                                      f"the watch ({reason}); watching again would not help.")
