"""pytest fixtures over a real etcd; enable with `pytest_plugins = ["etcd_rdzv.testing.fixtures"]`.

* ``etcd_server``: one :class:`~etcd_rdzv.testing.EtcdServer` for the session.
* ``key_prefix``: a fresh key prefix per test, so tests sharing the server never collide.
* ``etcd_config``: an :class:`~etcd_rdzv.config.EtcdConfig` for the server, short deadlines.
* ``etcd_client``: an :class:`~etcd_rdzv.EtcdClient` on the test's event loop, closed after.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

from ..config import EtcdConfig
from .cluster import EtcdServer

if TYPE_CHECKING:
    from .. import EtcdClient

__all__ = ["etcd_client", "etcd_config", "etcd_server", "key_prefix"]


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def key_prefix() -> str:
    return f"/etcd-rdzv-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def etcd_config(etcd_server: EtcdServer) -> EtcdConfig:
    return etcd_server.client_config(read_timeout=10.0, request_timeout=2.0,
                                     connect_timeout=5.0)


@pytest_asyncio.fixture
async def etcd_client(etcd_config: EtcdConfig) -> AsyncIterator[EtcdClient]:
    from .. import EtcdClient  # grpc loads with the first test that needs a client

    async with EtcdClient(etcd_config) as client:
        yield client
