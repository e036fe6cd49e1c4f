"""Transient against permanent errors, and :meth:`EtcdClient.follow`, against real etcd.

What can pass by waiting (etcd stopped, no answer in time) is a :class:`TransientError`, and
the loops that wait retry it; what cannot (a refused permission or password, a TLS
misconfiguration, a lost lease) is an :class:`EtcdConnectionError` that is not transient,
raised at once, whatever deadline is left. ``follow`` yields every change in order, once,
across stream breaks and member restarts, and raises :class:`CompactedError` and permanent
errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from aetcd import rpc, utils

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    AsyncEtcdStore,
    CompactedError,
    Deadline,
    EtcdAuthError,
    EtcdClient,
    EtcdConfig,
    EtcdConnectionError,
    EtcdTLSError,
    LeaseNotFoundError,
    StoreTimeoutError,
    TransientError,
    UnavailableError,
)
from etcd_rdzv._connection import UNTIL_CANCELLED, WatchEvent
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.testing import EtcdCluster, EtcdServer, TlsCertificates

#: A deadline far longer than any test waits for a permanent error: one raised within
#: ``AT_ONCE`` was not retried until it.
LONG_TIMEOUT = 20.0
AT_ONCE = 3.0


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        server.enable_auth("root-secret")
        server.add_user("alice", "alice-secret", "/jobs/")
        yield server




@pytest.fixture(scope="module")
def tls_server(certs: TlsCertificates) -> Iterator[EtcdServer]:
    with EtcdServer(tls=certs) as server:
        yield server


def alice(server: EtcdServer, password: str = "alice-secret") -> EtcdConfig:
    return server.client_config(read_timeout=LONG_TIMEOUT, request_timeout=1.0,
                                username="alice", password=password)


@contextlib.contextmanager
def raised_at_once() -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < AT_ONCE, "retried as if it could pass"


async def put(client: EtcdClient, key: bytes, value: bytes) -> int:
    return await client.put(key, value, 0, Deadline.after(10))


async def collect(events: AsyncIterator[WatchEvent], count: int,
                  timeout: float = 30.0) -> list[WatchEvent]:
    async def take() -> list[WatchEvent]:
        return [await anext(events) for _ in range(count)]
    return await asyncio.wait_for(take(), timeout)


def key_of(prefix: str, name: str) -> bytes:
    return f"{prefix}/{name}".encode()


# --- the hierarchy ------------------------------------------------------------------------------

def test_transient_and_permanent_errors_in_the_hierarchy() -> None:
    assert issubclass(TransientError, EtcdConnectionError)
    assert issubclass(UnavailableError, TransientError)
    for permanent in (EtcdAuthError, EtcdTLSError, LeaseNotFoundError):
        assert issubclass(permanent, EtcdConnectionError)
        assert not issubclass(permanent, TransientError)


# --- permanent errors surface at once -----------------------------------------------------------

async def test_a_permission_denial_is_raised_at_once_and_is_not_transient(
    auth_server: EtcdServer,
) -> None:
    async with EtcdClient(alice(auth_server)) as client:
        backend = AsyncEtcdRendezvousBackend(client, "run", key_prefix="/forbidden")
        with raised_at_once(), pytest.raises(EtcdAuthError, match="permission denied") as info:
            await backend.get_state()
        assert not isinstance(info.value, TransientError)
        assert "'alice' needs read-write access" in str(info.value)


async def test_waits_surface_a_permission_denial_at_once_instead_of_waiting_it_out(
    auth_server: EtcdServer,
) -> None:
    async with EtcdClient(alice(auth_server)) as client:
        backend = AsyncEtcdRendezvousBackend(client, "run", key_prefix="/forbidden")
        with raised_at_once(), pytest.raises(EtcdAuthError):
            await backend.wait_for_change(None, LONG_TIMEOUT)
        with raised_at_once(), pytest.raises(EtcdAuthError):
            await backend.wait_for_change(1, LONG_TIMEOUT)  # follows at once, no read first
        store = AsyncEtcdStore(client, RunKeys("run", "/forbidden").store_prefix,
                               backend.lease)
        with raised_at_once(), pytest.raises(EtcdAuthError):
            await store.get("MASTER_ADDR", LONG_TIMEOUT)


async def test_a_refused_password_is_raised_at_once_and_is_not_transient(
    auth_server: EtcdServer,
) -> None:
    async with EtcdClient(alice(auth_server, password="wrong")) as client:
        with raised_at_once(), pytest.raises(EtcdAuthError, match="rejected the credentials") \
                as info:
            await client.get(b"/jobs/x", Deadline.after(LONG_TIMEOUT))
        assert not isinstance(info.value, TransientError)


async def test_a_tls_misconfiguration_is_raised_at_once_and_is_not_transient(
    tls_server: EtcdServer, other_certs: TlsCertificates,
) -> None:
    config = tls_server.client_config(read_timeout=LONG_TIMEOUT, request_timeout=1.0,
                                      protocol="https", ca_cert=other_certs.ca_cert)
    async with EtcdClient(config) as client:
        with raised_at_once(), pytest.raises(EtcdTLSError, match="not signed by ca_cert") \
                as info:
            await client.get(b"/jobs/x", Deadline.after(LONG_TIMEOUT))
        assert not isinstance(info.value, TransientError)
        with raised_at_once(), pytest.raises(EtcdTLSError):
            await AsyncEtcdRendezvousBackend(client, "run").wait_for_change(None, LONG_TIMEOUT)


async def test_a_lost_lease_is_raised_at_once_and_is_not_transient(
    etcd_client: EtcdClient, key_prefix: str,
) -> None:
    lease = await etcd_client.grant_lease(60, Deadline.after(10))
    assert await etcd_client.revoke_lease(lease, Deadline.after(10))
    with raised_at_once(), pytest.raises(LeaseNotFoundError) as info:
        await etcd_client.put(key_of(key_prefix, "k"), b"v", lease, Deadline.after(LONG_TIMEOUT))
    assert not isinstance(info.value, TransientError)


# --- transient errors: retried, then a TransientError -------------------------------------------

async def test_a_stopped_etcd_gives_a_transient_error_once_the_deadline_passes() -> None:
    with EtcdServer() as server:
        config = server.client_config(read_timeout=1.5, request_timeout=0.5)
        async with EtcdClient(config) as client:
            backend = AsyncEtcdRendezvousBackend(client, "run", key_prefix="/stopped")
            first = await backend.set_state(b"x")
            assert first is not None
            server.kill(0)
            started = time.monotonic()
            with pytest.raises(TransientError, match="is unavailable") as info:
                await backend.get_state()
            assert isinstance(info.value, UnavailableError)
            assert time.monotonic() - started >= 1.0  # retried until read_timeout
            # A compare-and-swap that cannot learn its outcome in time is transient too.
            with pytest.raises(TransientError):
                await backend.set_state(b"y", first[1])
            # A wait waits the outage out, and says nothing changed.
            assert not await backend.wait_for_change(first[1], 1.0)


async def test_the_store_keeps_waiting_across_an_outage() -> None:
    with EtcdServer() as server:
        config = server.client_config(read_timeout=2, request_timeout=0.5)
        async with EtcdClient(config) as reader, EtcdClient(config) as writer:
            backend = AsyncEtcdRendezvousBackend(reader, "run", key_prefix="/outage")
            store = AsyncEtcdStore(reader, RunKeys("run", "/outage").store_prefix,
                                   backend.lease)
            waiting = asyncio.create_task(store.get("MASTER_ADDR", 60))
            await asyncio.sleep(0.5)
            server.kill(0)
            await asyncio.sleep(3)  # longer than read_timeout: the wait must not give up
            assert not waiting.done()
            await asyncio.to_thread(server.restart, 0)
            await writer.put(RunKeys("run", "/outage").store_prefix + b"MASTER_ADDR",
                             b"10.0.0.1", 0, Deadline.after(10))
            assert await asyncio.wait_for(waiting, 30) == b"10.0.0.1"
            with pytest.raises(StoreTimeoutError, match="MASTER_PORT"):
                await store.get("MASTER_PORT", 0.3)


# --- follow -------------------------------------------------------------------------------------

async def test_follow_yields_every_change_in_order_then_waits(
    etcd_client: EtcdClient, key_prefix: str,
) -> None:
    prefix = key_prefix.encode() + b"/"
    first = await put(etcd_client, prefix + b"a", b"1")
    await put(etcd_client, prefix + b"b", b"2")
    await etcd_client.delete(prefix + b"a", Deadline.after(10))
    async with contextlib.aclosing(etcd_client.follow(
            prefix, first, range_end=utils.prefix_range_end(prefix))) as events:
        seen = await collect(events, 3)
        assert [(e.key, e.value) for e in seen] == [
            (prefix + b"a", b"1"), (prefix + b"b", b"2"), (prefix + b"a", None)]
        assert [e.revision for e in seen] == sorted(e.revision for e in seen)
        later = await put(etcd_client, prefix + b"c", b"3")
        [event] = await collect(events, 1)
        assert (event.revision, event.key, event.value) == (later, prefix + b"c", b"3")
        with pytest.raises(asyncio.TimeoutError):
            await collect(events, 1, timeout=0.5)


async def test_follow_resumes_after_its_stream_breaks_without_losing_or_repeating(
    etcd_config: EtcdConfig, etcd_client: EtcdClient, key_prefix: str,
) -> None:
    key = key_of(key_prefix, "k")
    start = await put(etcd_client, key, b"0")
    async with EtcdClient(etcd_config) as follower, \
            contextlib.aclosing(follower.follow(key, start)) as events:
        assert [e.value for e in await collect(events, 1)] == [b"0"]
        # The channel closed under the stream (what a reconnect does): the stream breaks,
        # the writes made meanwhile are read from the revision after the last one yielded.
        await follower.close()
        revisions = [await put(etcd_client, key, str(i).encode()) for i in range(1, 6)]
        seen = await collect(events, 5)
        assert [e.revision for e in seen] == revisions
        assert [e.value for e in seen] == [str(i).encode() for i in range(1, 6)]


@pytest.mark.timeout(180)
async def test_follow_yields_every_change_across_a_member_kill_and_restart() -> None:
    with EtcdCluster(3) as cluster:
        # The follower talks to member 0 only; the writer to the others, which keep a quorum.
        follower_config = EtcdConfig(endpoints=parse_endpoints(cluster.members[0].endpoint),
                                     read_timeout=5, request_timeout=1)
        writer_config = EtcdConfig(endpoints=parse_endpoints(
            f"{cluster.members[1].endpoint},{cluster.members[2].endpoint}"),
            read_timeout=10, request_timeout=2)
        key = b"/member-kill/k"
        async with EtcdClient(follower_config) as follower, \
                EtcdClient(writer_config) as writer:
            start = await put(writer, key, b"0")
            async with contextlib.aclosing(follower.follow(key, start)) as events:
                assert [e.value for e in await collect(events, 1)] == [b"0"]
                cluster.kill(0)
                revisions = [await put(writer, key, str(i).encode()) for i in range(1, 4)]
                await asyncio.sleep(1)  # the follower retries against the dead member
                await asyncio.to_thread(cluster.restart, 0)
                revisions += [await put(writer, key, b"4")]
                seen = await collect(events, 4, timeout=60)
                assert [e.revision for e in seen] == revisions
                assert [e.value for e in seen] == [b"1", b"2", b"3", b"4"]


async def test_follow_raises_compacted_error_after_a_compaction_past_its_revision() -> None:
    # Compaction covers etcd's whole keyspace: this etcd is the test's own.
    with EtcdServer() as server:
        async with EtcdClient(server.client_config(read_timeout=5)) as client:
            key = b"/compacted/k"
            first = await put(client, key, b"1")
            await put(client, key, b"2")
            last = await put(client, key, b"3")
            assert await client.compact(last, Deadline.after(5))
            with raised_at_once(), pytest.raises(CompactedError) as info:
                async with contextlib.aclosing(client.follow(key, first + 1)) as events:
                    await anext(events)
            assert info.value.compact_revision == last
            # The caller's way on: read afresh, follow from the read's revision + 1.
            read = await client.get(key, UNTIL_CANCELLED)
            assert bytes(read.kvs[0].value) == b"3"
            async with contextlib.aclosing(
                    client.follow(key, int(read.header.revision) + 1)) as events:
                after = await put(client, key, b"4")
                assert [(e.revision, e.value) for e in await collect(events, 1)] == \
                    [(after, b"4")]


async def test_follow_raises_an_auth_error_at_once_for_a_user_without_permission(
    auth_server: EtcdServer,
) -> None:
    async with EtcdClient(alice(auth_server)) as client:
        with raised_at_once(), pytest.raises(EtcdAuthError, match="needs read access") as info:
            async with contextlib.aclosing(client.follow(b"/forbidden/k", 1)) as events:
                await anext(events)
        assert not isinstance(info.value, TransientError)
        # Within the user's prefix it follows.
        key = f"/jobs/{uuid.uuid4().hex}".encode()
        written = await client.put(key, b"v", 0, Deadline.after(10))
        async with contextlib.aclosing(client.follow(key, written)) as events:
            assert [e.value for e in await collect(events, 1)] == [b"v"]


async def test_a_mirror_of_a_prefix_is_short_and_exact(
    etcd_client: EtcdClient, key_prefix: str,
) -> None:
    """The pattern follow is designed for: one read at R, follow from R + 1, apply."""
    prefix = key_prefix.encode() + b"/"
    end = utils.prefix_range_end(prefix)
    for name in (b"a", b"b"):
        await put(etcd_client, prefix + name, name)
    read = await etcd_client.range(rpc.RangeRequest(key=prefix, range_end=end),
                                   UNTIL_CANCELLED, "Reading the prefix")
    mirror: dict[bytes, bytes] = {bytes(kv.key): bytes(kv.value) for kv in read.kvs}
    await put(etcd_client, prefix + b"c", b"c")
    await etcd_client.delete(prefix + b"a", Deadline.after(10))
    await etcd_client.txn_idempotent(rpc.TxnRequest(success=[
        rpc.RequestOp(request_put=rpc.PutRequest(key=prefix + b"d", value=b"d")),
        rpc.RequestOp(request_put=rpc.PutRequest(key=prefix + b"b", value=b"B")),
    ]), Deadline.after(10), "Writing two keys")
    async with contextlib.aclosing(etcd_client.follow(
            prefix, int(read.header.revision) + 1, range_end=end)) as events:
        changes = await collect(events, 4)
    for event in changes:
        if event.value is None:
            mirror.pop(event.key, None)
        else:
            mirror[event.key] = event.value
    # The two keys of one Txn share its revision.
    assert changes[2].revision == changes[3].revision
    now = await etcd_client.get_prefix(prefix, Deadline.after(10))
    assert mirror == {bytes(kv.key): bytes(kv.value) for kv in now.kvs} == {
        prefix + b"b": b"B", prefix + b"c": b"c", prefix + b"d": b"d"}


async def test_wait_for_change_after_a_compaction_waits_for_a_real_change() -> None:
    # A compaction past token + 1 used to report a change at once, and a caller whose key
    # had not changed woke again and again; now the key is read and followed on.
    with EtcdServer() as server:
        async with EtcdClient(server.client_config(read_timeout=5)) as client:
            backend = AsyncEtcdRendezvousBackend(client, "run", key_prefix="/quiet")
            written = await backend.set_state(b"x")
            assert written is not None
            for i in range(3):
                await put(client, b"/quiet-other", str(i).encode())
            last = await put(client, b"/quiet-other", b"last")
            assert await client.compact(last, Deadline.after(5))
            assert not await backend.wait_for_change(written[1], 0.5)
            waiting = asyncio.create_task(backend.wait_for_change(written[1], 10))
            await asyncio.sleep(0.2)
            assert await backend.set_state(b"y", written[1]) is not None
            assert await asyncio.wait_for(waiting, 10)
