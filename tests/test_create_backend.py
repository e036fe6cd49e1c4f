"""``create_backend``: torch's ``CreateBackendTest`` ported to etcd-v3, and what it adds."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousParameters,
)
from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo

from etcd_rdzv import Deadline, EtcdClient, EtcdConfig
from etcd_rdzv.codec import StateCodec
from etcd_rdzv.elastic import EtcdRendezvousBackend, EtcdStore, create_backend
from etcd_rdzv.testing import EtcdServer, EtcdStartError, free_port


def make_params(endpoint: str, **config: Any) -> RendezvousParameters:
    options = {"protocol": "hTTp", "read_timeout": "10", **config}
    return RendezvousParameters(
        backend="etcd-v3",
        endpoint=endpoint,
        run_id=f"run-{uuid.uuid4().hex[:8]}",
        min_nodes=1,
        max_nodes=1,
        **options,
    )


def raw_kv(config: EtcdConfig, key: bytes) -> Any:
    """The ``KeyValue`` at ``key`` (None if absent) and its lease's seconds left."""

    async def read() -> Any:
        async with EtcdClient(config) as client:
            response = await client.get(key, Deadline.after(5))
            kv = response.kvs[0] if response.kvs else None
            ttl = (await client.lease_status(kv.lease, Deadline.after(5))).ttl if kv else None
            return kv, ttl

    return asyncio.run(read())


@pytest.fixture
def endpoint(etcd_server: EtcdServer) -> str:
    return etcd_server.get_endpoint()


def test_create_backend_returns_backend(endpoint: str, etcd_config: EtcdConfig) -> None:
    params = make_params(endpoint)
    backend, store = create_backend(params)
    assert isinstance(backend, EtcdRendezvousBackend)
    assert backend.name == "etcd-v3"
    assert isinstance(store, EtcdStore)
    assert backend.async_backend.client.config.read_timeout == 10

    backend.set_state(b"dummy_state")
    kv, ttl = raw_kv(etcd_config, f"/torch/elastic/rendezvous/{params.run_id}".encode())
    assert StateCodec().decode(kv.value, key=b"k") == b"dummy_state"
    assert 0 < ttl <= 7200 + backend.async_backend.lease.window

    store.set("dummy_key", "dummy_value")
    kv, _ = raw_kv(etcd_config,
                   f"/torch/elastic/rendezvous/{params.run_id}/store/dummy_key".encode())
    assert kv.value == b"dummy_value"
    assert kv.lease != 0
    backend.close()


@pytest.mark.parametrize(("option", "default"), [("protocol", "http"), ("read_timeout", 60)])
def test_create_backend_returns_backend_if_option_is_not_specified(
    endpoint: str, option: str, default: object
) -> None:
    params = make_params(endpoint)
    del params.config[option]
    backend, _ = create_backend(params)
    assert getattr(backend.async_backend.client.config, option) == default
    backend.close()


@pytest.mark.parametrize("bad_endpoint", ["127.0.0.1:{port}", "dummy.invalid:1234"])
def test_create_backend_raises_error_if_etcd_is_unreachable(bad_endpoint: str) -> None:
    bad = bad_endpoint.format(port=free_port())
    with pytest.raises(RendezvousConnectionError, match=r"^The connection to etcd has failed") \
            as info:
        create_backend(make_params(bad, read_timeout="2"))
    assert bad in str(info.value)


def test_create_backend_raises_error_if_protocol_is_invalid(endpoint: str) -> None:
    with pytest.raises(ValueError, match=r"^The protocol must be HTTP or HTTPS\."):
        create_backend(make_params(endpoint, protocol="dummy"))


@pytest.mark.parametrize("read_timeout", ["0", "-10"])
def test_create_backend_raises_error_if_read_timeout_is_invalid(
    endpoint: str, read_timeout: str
) -> None:
    with pytest.raises(ValueError, match=r"^The read timeout must be a positive integer\."):
        create_backend(make_params(endpoint, read_timeout=read_timeout))


def test_get_waits_for_store_prefix_key(endpoint: str) -> None:
    backend, store = create_backend(make_params(endpoint))
    backend.set_state(b"dummy_state")
    getter_started = threading.Event()
    key_set = threading.Event()
    result: dict[str, Any] = {}

    def store_get() -> None:
        getter_started.set()
        result["value"] = store.get(RendezvousStoreInfo.MASTER_ADDR_KEY)
        result["set_before_return"] = key_set.is_set()

    getter = threading.Thread(target=store_get)
    getter.start()
    getter_started.wait()
    # The getter is blocked on its watch; nothing has been written yet.
    getter.join(timeout=1.0)
    assert getter.is_alive()
    key_set.set()
    store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, "foo")
    getter.join(timeout=10)
    assert not getter.is_alive()
    assert result == {"value": b"foo", "set_before_return": True}


def test_several_endpoints_fail_over_to_the_live_one(endpoint: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    backend, _ = create_backend(make_params(f"{dead},{endpoint}"))
    assert backend.set_state(b"x") is not None
    assert backend.get_state() is not None
    backend.close()


def test_ipv6_endpoint() -> None:
    with EtcdServer(host="::1") as server:
        assert server.get_endpoint().startswith("[::1]:")
        backend, _ = create_backend(make_params(server.get_endpoint()))
        result = backend.set_state(b"v6")
        assert result is not None and result[2]
        backend.close()


def test_a_server_on_a_chosen_client_port_and_one_where_it_is_taken() -> None:
    port = free_port()
    with EtcdServer(client_port=port) as server:
        assert server.get_endpoint() == f"127.0.0.1:{port}"
        backend, _ = create_backend(make_params(server.get_endpoint()))
        assert backend.set_state(b"on the chosen port") is not None
        backend.close()
        with pytest.raises(EtcdStartError, match=f"client_port={port} is taken"), \
                EtcdServer(client_port=port):
            pass


def test_key_prefix_and_ttl_reach_the_stored_key(endpoint: str, etcd_config: EtcdConfig) -> None:
    params = make_params(endpoint, key_prefix="/custom/prefix/", ttl="50")
    backend, _ = create_backend(params)
    backend.set_state(b"s")
    kv, ttl = raw_kv(etcd_config, f"/custom/prefix/{params.run_id}".encode())
    assert kv is not None
    assert 0 < ttl <= 50 + backend.async_backend.lease.window
    backend.close()
