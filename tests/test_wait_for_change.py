"""``wait_for_change``: wake on an etcd watch of the state key, never miss a write."""

from __future__ import annotations

import asyncio

import pytest

from etcd_rdzv import AsyncEtcdRendezvousBackend, Deadline, EtcdClient, EtcdConfig
from etcd_rdzv.elastic import EtcdRendezvousBackend
from etcd_rdzv.testing import EtcdServer


@pytest.fixture
def backend(etcd_client: EtcdClient, key_prefix: str) -> AsyncEtcdRendezvousBackend:
    return AsyncEtcdRendezvousBackend(etcd_client, "run", key_prefix=key_prefix)


async def current_token(backend: AsyncEtcdRendezvousBackend) -> int:
    state = await backend.get_state()
    assert state is not None
    return state[1]


async def test_returns_false_when_nothing_changes(backend: AsyncEtcdRendezvousBackend) -> None:
    await backend.set_state(b"x")
    assert not await backend.wait_for_change(await current_token(backend), 0.3)


async def test_wakes_on_a_write_by_someone_else(backend: AsyncEtcdRendezvousBackend) -> None:
    await backend.set_state(b"x")
    token = await current_token(backend)

    async def write_later() -> None:
        await asyncio.sleep(0.2)
        await backend.set_state(b"y", token)

    writer = asyncio.create_task(write_later())
    assert await backend.wait_for_change(token, 10)
    await writer
    assert (await backend.get_state() or (b"", 0))[0] == b"y"


async def test_a_write_before_the_call_is_not_missed(backend: AsyncEtcdRendezvousBackend) -> None:
    await backend.set_state(b"x")
    token = await current_token(backend)
    await backend.set_state(b"y", token)  # between the caller's read and its wait
    assert await backend.wait_for_change(token, 10)


async def test_none_token_wakes_when_the_state_is_created(
    backend: AsyncEtcdRendezvousBackend,
) -> None:
    assert not await backend.wait_for_change(None, 0.2)

    async def create_later() -> None:
        await asyncio.sleep(0.2)
        await backend.set_state(b"new")

    creator = asyncio.create_task(create_later())
    assert await backend.wait_for_change(None, 10)
    await creator


async def test_wakes_when_the_state_is_deleted(
    backend: AsyncEtcdRendezvousBackend, etcd_client: EtcdClient
) -> None:
    await backend.set_state(b"x")
    token = await current_token(backend)
    await etcd_client.delete(backend.key, Deadline.after(5))
    assert await backend.wait_for_change(token, 10)


@pytest.mark.parametrize("token", ["invalid", -3, 2.5])
async def test_an_invalid_token_returns_at_once(backend: AsyncEtcdRendezvousBackend,
                                                token: object) -> None:
    assert await backend.wait_for_change(token, 10)


def test_the_shim_exposes_it(etcd_config: EtcdConfig, key_prefix: str) -> None:
    shim = EtcdRendezvousBackend(
        AsyncEtcdRendezvousBackend(EtcdClient(etcd_config), "run", key_prefix=key_prefix))
    result = shim.set_state(b"x")
    assert result is not None
    assert not shim.wait_for_change(result[1], 0.2)
    shim.set_state(b"y", result[1])
    assert shim.wait_for_change(result[1], 5)
    shim.close()


async def test_a_paused_server_makes_it_wait_not_raise() -> None:
    with EtcdServer() as server:
        config = server.client_config(read_timeout=2, request_timeout=0.3)
        async with EtcdClient(config) as client:
            backend = AsyncEtcdRendezvousBackend(client, "run")
            await backend.set_state(b"x")
            token = await current_token(backend)
            server.pause(0)
            try:
                assert not await backend.wait_for_change(token, 1.0)
            finally:
                server.resume(0)
