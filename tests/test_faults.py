"""Deadlines and ambiguous writes, with a real etcd paused, killed and restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    Deadline,
    EtcdClient,
    EtcdConfig,
    EtcdConnectionError,
)
from etcd_rdzv.cas import CasResult, Expect, resolve_lost_answer
from etcd_rdzv.codec import StateCodec
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdServer, free_port


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


def fast_config(endpoint: str, read_timeout: float = 10.0) -> EtcdConfig:
    return EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=read_timeout,
                      request_timeout=0.3, connect_timeout=2.0)


@pytest_asyncio.fixture
async def backend(server: EtcdServer) -> AsyncIterator[AsyncEtcdRendezvousBackend]:
    client = EtcdClient(fast_config(server.get_endpoint()))
    yield AsyncEtcdRendezvousBackend(client, "run", key_prefix="/faults")
    await client.close()


async def test_write_that_timed_out_on_a_paused_server_is_resolved_by_reading(
    server: EtcdServer, backend: AsyncEtcdRendezvousBackend
) -> None:
    first = await backend.set_state(b"a")
    assert first is not None
    token = first[1]
    server.pause(0)
    try:
        write = asyncio.create_task(backend.set_state(b"b", token))
        await asyncio.sleep(1.5)  # several attempts time out; the outcome is unknown
        assert not write.done()
    finally:
        server.resume(0)
    state, new_token, has_set = await write or (b"", 0, False)
    assert (state, has_set) == (b"b", True)
    assert new_token == token + 1  # applied exactly once
    assert await backend.get_state() == (b"b", new_token)


async def test_write_survives_a_server_restart_within_read_timeout(
    server: EtcdServer, backend: AsyncEtcdRendezvousBackend
) -> None:
    first = await backend.set_state(b"a")
    assert first is not None
    server.kill(0)
    write = asyncio.create_task(backend.set_state(b"b", first[1]))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(server.restart, 0)
    result = await write
    assert result is not None and result[0] == b"b" and result[2]
    assert await backend.get_state() == (b"b", result[1])


async def test_a_hung_server_fails_within_read_timeout(server: EtcdServer) -> None:
    client = EtcdClient(fast_config(server.get_endpoint(), read_timeout=1.5))
    backend = AsyncEtcdRendezvousBackend(client, "run", key_prefix="/faults")
    await backend.get_state()
    server.pause(0)
    try:
        started = time.monotonic()
        with pytest.raises(EtcdConnectionError, match=server.get_endpoint()):
            await backend.get_state()
        assert time.monotonic() - started < 1.5 + 1.0
    finally:
        server.resume(0)
    await client.close()


async def test_unreachable_endpoint_fails_within_read_timeout_naming_it() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    client = EtcdClient(fast_config(endpoint, read_timeout=1.0))
    backend = AsyncEtcdRendezvousBackend(client, "run")
    started = time.monotonic()
    with pytest.raises(EtcdConnectionError, match=f"etcd at {endpoint} is unavailable"):
        await backend.set_state(b"x")
    assert time.monotonic() - started < 1.0 + 1.0
    await client.close()


@pytest.mark.parametrize("ours_landed", [True, False])
async def test_an_unknown_outcome_is_resolved_from_the_history(
    backend: AsyncEtcdRendezvousBackend, ours_landed: bool
) -> None:
    """The race a timeout leaves open: our write may have landed and been overwritten
    before we could read it back. The first change after our token tells whose it was."""
    first = await backend.set_state(b"a")
    assert first is not None
    token = first[1]
    codec = StateCodec()
    ours = codec.encode(b"ours", key=backend.key)
    theirs = codec.encode(b"theirs", key=backend.key)
    client = backend.client
    for value in ([ours, theirs] if ours_landed else [theirs]):
        await client.put(backend.key, value, 0, Deadline.after(5))
    outcome = await resolve_lost_answer(client, backend.key, Expect.at_revision(token), ours,
                                        Deadline.after(5), "test write", tagged=True)
    if ours_landed:
        assert outcome == CasResult("applied", token + 1, ours)
    else:
        assert outcome == CasResult("conflict", token + 1, theirs)


async def test_an_unknown_outcome_over_compacted_history_is_an_error(
    backend: AsyncEtcdRendezvousBackend,
) -> None:
    first = await backend.set_state(b"a")
    assert first is not None
    codec, client = StateCodec(), backend.client
    ours = codec.encode(b"ours", key=backend.key)
    await client.put(backend.key, codec.encode(b"x", key=backend.key), 0, Deadline.after(5))
    revision = await client.put(backend.key, codec.encode(b"y", key=backend.key), 0,
                                Deadline.after(5))
    await client.compact(revision, Deadline.after(5))
    with pytest.raises(EtcdConnectionError, match=r"unknown outcome.*compacted"):
        await resolve_lost_answer(client, backend.key, Expect.at_revision(first[1]), ours,
                                  Deadline.after(5), "test write", tagged=True)
