"""TLS, mTLS and username/password auth against real etcd servers with generated certificates.

The certificates are made at test time (``make_certificates``, openssl); none is committed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    EtcdAuthError,
    EtcdClient,
    EtcdConfig,
    EtcdConnectionError,
)
from etcd_rdzv.elastic import create_backend
from etcd_rdzv.testing import EtcdCluster, EtcdServer, TlsCertificates


@pytest.fixture(scope="module")
def mtls_server(certs: TlsCertificates) -> Iterator[EtcdServer]:
    with EtcdServer(tls=certs, client_cert_auth=True) as server:
        yield server


def config(server: EtcdCluster, **options: Any) -> EtcdConfig:
    return server.client_config(read_timeout=5.0, request_timeout=1.0, **options)


async def write_once(cfg: EtcdConfig, run_id: str = "run") -> tuple[bytes, int, bool] | None:
    async with EtcdClient(cfg) as client:
        return await AsyncEtcdRendezvousBackend(client, run_id, key_prefix="/sec").set_state(b"x")


async def test_mtls_with_the_right_certificates_works(
    mtls_server: EtcdServer, certs: TlsCertificates
) -> None:
    result = await write_once(config(
        mtls_server, protocol="https", ca_cert=certs.ca_cert,
        ssl_cert=certs.client_cert, ssl_cert_key=certs.client_key), run_id=uuid.uuid4().hex)
    assert result is not None and result[2]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("plaintext", "if etcd serves TLS, set protocol=https"),
        ("wrong_ca", "the server's certificate is not signed by ca_cert="),
        ("no_client_cert", "refused the client certificate (no ssl_cert)"),
        ("foreign_client_cert", "refused the client certificate (ssl_cert="),
    ],
)
async def test_tls_misconfigurations_fail_fast_saying_which(
    mtls_server: EtcdServer, certs: TlsCertificates, other_certs: TlsCertificates,
    case: str, message: str,
) -> None:
    options: dict[str, Any] = {
        "plaintext": {},
        "wrong_ca": {"protocol": "https", "ca_cert": other_certs.ca_cert,
                     "ssl_cert": certs.client_cert, "ssl_cert_key": certs.client_key},
        "no_client_cert": {"protocol": "https", "ca_cert": certs.ca_cert},
        "foreign_client_cert": {"protocol": "https", "ca_cert": certs.ca_cert,
                                "ssl_cert": other_certs.client_cert,
                                "ssl_cert_key": other_certs.client_key},
    }[case]
    started = time.monotonic()
    with pytest.raises(EtcdConnectionError, match=re.escape(message)) as info:
        await write_once(config(mtls_server, **options))
    assert not isinstance(info.value, EtcdAuthError)
    assert time.monotonic() - started < 5.0  # fails at once, not after read_timeout's retries


def test_create_backend_over_mtls(mtls_server: EtcdServer, certs: TlsCertificates) -> None:
    params = RendezvousParameters(
        "etcd-v3", mtls_server.get_endpoint(), f"tls-{uuid.uuid4().hex[:6]}", 1, 1,
        protocol="https", ca_cert=str(certs.ca_cert), ssl_cert=str(certs.client_cert),
        ssl_cert_key=str(certs.client_key),
    )
    backend, store = create_backend(params)
    assert backend.set_state(b"secure") is not None
    store.set("MASTER_ADDR", "127.0.0.1")
    assert store.get("MASTER_ADDR") == b"127.0.0.1"
    backend.close()


def test_create_backend_with_a_wrong_ca_raises_a_connection_error_naming_it(
    mtls_server: EtcdServer, other_certs: TlsCertificates
) -> None:
    params = RendezvousParameters(
        "etcd-v3", mtls_server.get_endpoint(), "tls-bad", 1, 1, protocol="https",
        ca_cert=str(other_certs.ca_cert), read_timeout="5",
    )
    with pytest.raises(RendezvousConnectionError, match=str(other_certs.ca_cert)):
        create_backend(params)


async def test_tls_over_several_endpoints(certs: TlsCertificates) -> None:
    with EtcdCluster(3, tls=certs) as cluster:
        result = await write_once(config(cluster, protocol="https",
                                         ca_cert=certs.ca_cert))
        assert result is not None and result[2]


@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    with EtcdServer(extra_args=["--auth-token-ttl=1"]) as server:
        server.enable_auth("root-secret")
        server.add_user("alice", "alice-secret", "/jobs/")
        yield server


async def test_expired_token_is_renewed_transparently(
    auth_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(auth_server, username="alice", password="alice-secret")
    async with EtcdClient(cfg) as client:
        backend = AsyncEtcdRendezvousBackend(client, uuid.uuid4().hex, key_prefix="/jobs")
        first = await backend.set_state(b"before")
        assert first is not None
        # Simple tokens expire after --auth-token-ttl idle seconds, swept once a second.
        await asyncio.sleep(3.5)
        with caplog.at_level(logging.INFO, logger="etcd_rdzv"):
            assert await backend.get_state() == (b"before", first[1])
            second = await backend.set_state(b"after", first[1])
        assert second is not None and second[2]
        assert "authenticating again" in caplog.text


async def test_a_role_on_another_prefix_gets_a_permission_error_at_once(
    auth_server: EtcdServer,
) -> None:
    cfg = config(auth_server, username="alice", password="alice-secret")
    async with EtcdClient(cfg) as client:
        backend = AsyncEtcdRendezvousBackend(client, "run", key_prefix="/not-hers")
        started = time.monotonic()
        with pytest.raises(EtcdAuthError, match=r"permission denied.*'alice'") as info:
            await backend.get_state()
        assert "/not-hers/run" in str(info.value)
        assert time.monotonic() - started < 1.0  # no retry storm


async def test_a_wrong_password_is_named(auth_server: EtcdServer) -> None:
    cfg = config(auth_server, username="alice", password="nope")
    with pytest.raises(EtcdAuthError, match="rejected the credentials of user 'alice'"):
        await write_once(cfg)


def test_create_backend_reads_the_password_file(auth_server: EtcdServer, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("alice-secret\n")
    backend, _ = create_backend(RendezvousParameters(
        "etcd-v3", auth_server.get_endpoint(), f"auth-{uuid.uuid4().hex[:6]}", 1, 1,
        username="alice", password_file=str(secret), key_prefix="/jobs"))
    result = backend.set_state(b"ok")
    assert result is not None and result[2]
    backend.close()
