"""Every behavioural test runs against a real etcd from etcd_rdzv.testing.

Besides that plugin's fixtures (``etcd_server``, ``key_prefix``, ``etcd_config``,
``etcd_client``): ``stored_kv``, for tests that check what landed in etcd, byte for byte, and
``certs`` / ``other_certs``, two unrelated sets of throwaway TLS certificates (one module
each: making them takes a second).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from etcd_rdzv import Deadline
from etcd_rdzv.testing import TlsCertificates, make_certificates

if TYPE_CHECKING:
    from etcd_rdzv import EtcdClient

pytest_plugins = ["etcd_rdzv.testing.fixtures"]

StoredKv = Callable[[bytes], Awaitable[Any]]


@pytest.fixture
def stored_kv(etcd_client: EtcdClient) -> StoredKv:
    """Reads a key's etcd ``KeyValue`` (value, lease, revisions), None when it is absent."""

    async def read(key: bytes) -> Any:
        response = await etcd_client.get(key, Deadline.after(5))
        return response.kvs[0] if response.kvs else None

    return read


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificates:
    return make_certificates(tmp_path_factory.mktemp("other-pki"))
