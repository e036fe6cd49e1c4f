"""pytest fixtures over a real etcd; enable with `pytest_plugins = ["etcd_rdzv.testing.fixtures"]`.

* ``etcd_server``: one :class:`~etcd_rdzv.testing.EtcdServer` for the session.
* ``key_prefix``: a fresh key prefix per test, so tests sharing the server never collide.
* ``etcd_config``: an :class:`~etcd_rdzv.config.EtcdConfig` for the server, short deadlines.
* ``etcd_client``: an :class:`~etcd_rdzv.EtcdClient` on the test's event loop, closed after.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from ..config import EtcdConfig, parse_endpoints
from . import EtcdServer

__all__ = ["etcd_client", "etcd_config", "etcd_server", "key_prefix"]


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def key_prefix() -> str:
    return f"/etcd-rdzv-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def etcd_config(etcd_server: EtcdServer) -> EtcdConfig:
    return EtcdConfig(
        endpoints=parse_endpoints(etcd_server.get_endpoint()),
        read_timeout=10.0,
        request_timeout=2.0,
        connect_timeout=5.0,
    )


@pytest_asyncio.fixture
async def etcd_client(etcd_config: EtcdConfig) -> AsyncIterator[object]:
    from .._connection import EtcdClient

    client = EtcdClient(etcd_config)
    try:
        yield client
    finally:
        await client.close()
