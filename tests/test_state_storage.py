"""The stored form, the size guard and the lease, against a real etcd."""

from __future__ import annotations

import asyncio
import random
import zlib

import pytest

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    Deadline,
    EtcdClient,
    EtcdStateError,
    StateCodec,
    StateTooLargeError,
)
from etcd_rdzv.codec import HEADER_SIZE
from etcd_rdzv.config import DEFAULT_MAX_REQUEST_BYTES
from etcd_rdzv.testing.states import torch_state

from .conftest import StoredKv


@pytest.fixture
def backend(etcd_client: EtcdClient, key_prefix: str) -> AsyncEtcdRendezvousBackend:
    return AsyncEtcdRendezvousBackend(etcd_client, "run", key_prefix=key_prefix)


async def stored_value(stored_kv: StoredKv, backend: AsyncEtcdRendezvousBackend) -> bytes:
    return bytes((await stored_kv(backend.key)).value)


async def test_large_state_is_compressed_and_round_trips(
    backend: AsyncEtcdRendezvousBackend, stored_kv: StoredKv
) -> None:
    state = torch_state(1000)
    result = await backend.set_state(state)
    assert result is not None and result[2]
    raw = await stored_value(stored_kv, backend)
    assert len(raw) < len(state) / 2
    assert zlib.decompress(raw[HEADER_SIZE:]) == state
    assert await backend.get_state() == (state, result[1])


async def test_small_state_is_stored_uncompressed(
    backend: AsyncEtcdRendezvousBackend, stored_kv: StoredKv
) -> None:
    await backend.set_state(b"small")
    raw = await stored_value(stored_kv, backend)
    assert raw[:4] == b"ERDZ"
    assert raw[5] == 0  # flags: not compressed
    assert raw[HEADER_SIZE:] == b"small"


async def test_every_write_is_tagged_uniquely(
    backend: AsyncEtcdRendezvousBackend, stored_kv: StoredKv
) -> None:
    _, token, _ = await backend.set_state(b"same") or (b"", 0, False)
    first = await stored_value(stored_kv, backend)
    await backend.set_state(b"same", token)
    second = await stored_value(stored_kv, backend)
    assert first != second
    assert first[HEADER_SIZE:] == second[HEADER_SIZE:] == b"same"


def test_ten_thousand_node_state_fits_with_a_wide_margin() -> None:
    state = torch_state(10_000)
    encoded = StateCodec().encode(state, key=b"/torch/elastic/rendezvous/run")
    assert len(state) > DEFAULT_MAX_REQUEST_BYTES / 2
    assert len(encoded) < DEFAULT_MAX_REQUEST_BYTES / 4


async def test_oversized_state_is_refused_before_anything_is_sent(
    backend: AsyncEtcdRendezvousBackend,
) -> None:
    state = random.Random(0).randbytes(2 * 1024 * 1024)  # incompressible
    with pytest.raises(StateTooLargeError) as info:
        await backend.set_state(state)
    message = str(info.value)
    assert f"{len(state):,} bytes" in message
    assert f"{DEFAULT_MAX_REQUEST_BYTES:,} bytes (max_request_bytes)" in message
    assert await backend.get_state() is None


async def test_oversized_state_leaves_the_stored_state_intact(
    backend: AsyncEtcdRendezvousBackend,
) -> None:
    _, token, _ = await backend.set_state(b"keep me") or (b"", 0, False)
    with pytest.raises(StateTooLargeError):
        await backend.set_state(random.Random(1).randbytes(2 * 1024 * 1024), token)
    assert await backend.get_state() == (b"keep me", token)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", "corrupt"),
        (b"ERDZ", "corrupt"),
        (b"plain text state", "does not start with the etcd_rdzv header"),
        (b"ERDZ\x02\x00" + b"t" * 8 + b"x", "format version 2"),
        (b"ERDZ\x01\x80" + b"t" * 8 + b"x", "flags 0x80"),
        (b"ERDZ\x01\x01" + b"t" * 8 + b"not zlib", "corrupt"),
        (b"ERDZ\x01\x01" + b"t" * 8 + zlib.compress(b"x" * 1000)[:-6], "truncated"),
    ],
)
async def test_undecodable_stored_values_raise_a_state_error(
    backend: AsyncEtcdRendezvousBackend, etcd_client: EtcdClient, stored_kv: StoredKv,
    value: bytes, message: str,
) -> None:
    await etcd_client.put(backend.key, value, 0, Deadline.after(5))
    with pytest.raises(EtcdStateError, match=message):
        await backend.get_state()
    # The conflict path decodes too, and must not overwrite what it cannot read.
    with pytest.raises(EtcdStateError, match=message):
        await backend.set_state(b"new")
    assert await stored_value(stored_kv, backend) == value


def test_decompression_bomb_is_refused() -> None:
    bomb = b"ERDZ\x01\x01" + b"t" * 8 + zlib.compress(b"\0" * (300 * 1024 * 1024), 9)
    with pytest.raises(EtcdStateError, match="inflates past"):
        StateCodec().decode(bomb, key=b"k")


async def test_lease_ttl_is_between_ttl_and_ttl_plus_window(
    etcd_client: EtcdClient, key_prefix: str, stored_kv: StoredKv
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "run", key_prefix=key_prefix, ttl=600)
    await backend.set_state(b"x")
    lease = await etcd_client.lease_status((await stored_kv(backend.key)).lease,
                                           Deadline.after(5))
    assert 600 - 2 <= lease.ttl <= 600 + backend.lease.window


async def test_writes_within_the_window_share_one_lease(
    backend: AsyncEtcdRendezvousBackend, stored_kv: StoredKv
) -> None:
    leases = set()
    token = None
    for index in range(5):
        result = await backend.set_state(b"%d" % index, token)
        assert result is not None and result[2]
        token = result[1]
        leases.add((await stored_kv(backend.key)).lease)
    assert len(leases) == 1


async def test_abandoned_state_expires_after_its_ttl(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "run", key_prefix=key_prefix, ttl=2)
    await backend.set_state(b"x")
    assert await backend.get_state() is not None
    for _ in range(100):
        if await backend.get_state() is None:
            break
        await asyncio.sleep(0.1)
    assert await backend.get_state() is None


async def test_a_revoked_lease_is_replaced_transparently(
    backend: AsyncEtcdRendezvousBackend, etcd_client: EtcdClient, stored_kv: StoredKv
) -> None:
    await backend.set_state(b"x")
    old_lease = int((await stored_kv(backend.key)).lease)
    assert await etcd_client.revoke_lease(old_lease, Deadline.after(5))  # the key goes too
    assert await backend.get_state() is None
    result = await backend.set_state(b"y")
    assert result is not None and result[2]
    assert int((await stored_kv(backend.key)).lease) not in (0, old_lease)
