"""torch's rendezvous backend contract, for the async backend and the sync shim alike.

One suite: each test awaits ``get_state``/``set_state`` on a :class:`ContractBackend`, which is
the async backend itself or the sync shim called from a worker thread. The cases follow
torch's ``RendezvousBackendTestMixin`` and the contract table of the reference notes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from torch.distributed.elastic.rendezvous import RendezvousStateError

from etcd_rdzv import AsyncEtcdRendezvousBackend, Deadline, EtcdClient, EtcdConfig, EtcdStateError
from etcd_rdzv.codec import HEADER_SIZE
from etcd_rdzv.elastic import EtcdRendezvousBackend

from .conftest import StoredKv


@dataclass
class ContractBackend:
    """The backend under test, awaited the same way whichever face it is."""

    name: str
    target: AsyncEtcdRendezvousBackend | EtcdRendezvousBackend
    state_error: type[Exception]
    key: bytes

    async def get_state(self) -> tuple[bytes, Any] | None:
        if isinstance(self.target, AsyncEtcdRendezvousBackend):
            return await self.target.get_state()
        return await asyncio.to_thread(self.target.get_state)

    async def set_state(self, state: bytes, token: Any = None) -> tuple[bytes, Any, bool] | None:
        if isinstance(self.target, AsyncEtcdRendezvousBackend):
            return await self.target.set_state(state, token)
        return await asyncio.to_thread(self.target.set_state, state, token)

    async def must_set(self, state: bytes, token: Any = None) -> tuple[bytes, Any, bool]:
        result = await self.set_state(state, token)
        assert result is not None
        return result


@pytest_asyncio.fixture(params=["async", "shim"])
async def backend(
    request: pytest.FixtureRequest, etcd_config: EtcdConfig, key_prefix: str
) -> AsyncIterator[ContractBackend]:
    core = AsyncEtcdRendezvousBackend(EtcdClient(etcd_config), "dummy_run_id",
                                      key_prefix=key_prefix)
    if request.param == "async":
        yield ContractBackend("async", core, EtcdStateError, core.key)
        await core.client.close()
    else:
        shim = EtcdRendezvousBackend(core)
        yield ContractBackend("shim", shim, RendezvousStateError, core.key)
        await asyncio.to_thread(shim.close)


async def test_name_is_the_registered_backend_name(backend: ContractBackend) -> None:
    assert backend.target.name == "etcd-v3"


async def test_get_state_returns_backend_state(backend: ContractBackend) -> None:
    await backend.set_state(b"x")
    result = await backend.get_state()
    assert result is not None
    state, token = result
    assert state == b"x"
    assert isinstance(token, int)


async def test_get_state_returns_none_if_backend_state_does_not_exist(
    backend: ContractBackend,
) -> None:
    assert await backend.get_state() is None


async def test_get_state_raises_error_if_backend_state_is_corrupt(
    backend: ContractBackend, etcd_client: EtcdClient
) -> None:
    await etcd_client.put(backend.key, b"non_base64 and no header", 0, Deadline.after(5))
    with pytest.raises(backend.state_error, match="corrupt"):
        await backend.get_state()


async def test_set_state_sets_backend_state_if_it_does_not_exist(
    backend: ContractBackend, stored_kv: StoredKv
) -> None:
    state, token, has_set = await backend.must_set(b"x")
    assert (state, has_set) == (b"x", True)
    kv = await stored_kv(backend.key)
    assert token == kv.mod_revision


async def test_set_state_sets_backend_state_if_token_is_current(backend: ContractBackend) -> None:
    _, token1, has_set1 = await backend.must_set(b"x")
    state2, token2, has_set2 = await backend.must_set(b"y", token1)
    assert state2 == b"y"
    assert token1 != token2
    assert has_set1 and has_set2
    assert await backend.get_state() == (b"y", token2)


async def test_set_state_returns_current_backend_state_if_token_is_old(
    backend: ContractBackend,
) -> None:
    _, token1, _ = await backend.must_set(b"x")
    state2, token2, _ = await backend.must_set(b"y", token1)
    state3, token3, has_set = await backend.must_set(b"z", token1)
    assert (state3, token3, has_set) == (state2, token2, False)
    assert await backend.get_state() == (b"y", token2)


async def test_set_state_returns_current_backend_state_if_token_is_none(
    backend: ContractBackend,
) -> None:
    state1, token1, _ = await backend.must_set(b"x")
    assert await backend.must_set(b"y") == (state1, token1, False)


@pytest.mark.parametrize("token", ["invalid", 3.0, b"3", object(), -1, True, "", "1e3"])
async def test_set_state_treats_a_token_of_the_wrong_type_as_stale(
    backend: ContractBackend, token: Any
) -> None:
    state1, token1, _ = await backend.must_set(b"x")
    assert await backend.must_set(b"y", token) == (state1, token1, False)
    assert await backend.get_state() == (b"x", token1)


async def test_set_state_accepts_a_token_as_an_int_parsable_string(
    backend: ContractBackend,
) -> None:
    _, token1, _ = await backend.must_set(b"x")
    state, token2, has_set = await backend.must_set(b"y", str(token1))
    assert (state, has_set) == (b"y", True)
    assert token2 > token1


async def test_set_state_with_a_token_but_no_state_returns_none(backend: ContractBackend) -> None:
    assert await backend.set_state(b"x", 12345) is None
    assert await backend.get_state() is None


async def test_set_state_rejects_a_state_that_is_not_bytes(backend: ContractBackend) -> None:
    with pytest.raises(TypeError, match="must be bytes, got str"):
        await backend.set_state("x")  # type: ignore[arg-type]
    assert await backend.get_state() is None


async def test_stored_value_is_raw_bytes_behind_a_header(
    backend: ContractBackend, stored_kv: StoredKv
) -> None:
    state = bytes(range(256))
    await backend.set_state(state)
    kv = await stored_kv(backend.key)
    assert kv.value[HEADER_SIZE:] == state
    assert kv.lease != 0


async def test_conflict_returns_state_and_token_from_the_same_round_trip(
    backend: ContractBackend, stored_kv: StoredKv
) -> None:
    _, token1, _ = await backend.must_set(b"x")
    await backend.must_set(b"y", token1)
    state, token, has_set = await backend.must_set(b"z", token1)
    kv = await stored_kv(backend.key)
    assert (state, token, has_set) == (b"y", kv.mod_revision, False)
