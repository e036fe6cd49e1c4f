"""Many writers on one state: every successful CAS counts exactly once."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, EtcdConfig
from etcd_rdzv.elastic import EtcdRendezvousBackend
from etcd_rdzv.testing.history import count_increments

ATTEMPTS_PER_WRITER = 25


async def counter(backend: AsyncEtcdRendezvousBackend) -> int:
    current = await backend.get_state()
    assert current is not None
    return int(current[0])


async def test_32_asyncio_tasks_count_exactly_their_successes(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "counter", key_prefix=key_prefix)
    await backend.set_state(b"0")
    successes = await asyncio.gather(
        *(count_increments(backend, attempts=ATTEMPTS_PER_WRITER) for _ in range(32)))
    assert await counter(backend) == sum(successes)
    assert sum(successes) >= ATTEMPTS_PER_WRITER  # someone always wins a round


def test_8_threads_through_the_shim_count_exactly_their_successes(
    etcd_config: EtcdConfig, key_prefix: str
) -> None:
    shim = EtcdRendezvousBackend(
        AsyncEtcdRendezvousBackend(EtcdClient(etcd_config), "counter", key_prefix=key_prefix))
    shim.set_state(b"0")

    def writer(_: int) -> int:
        """count_increments, made through the sync shim's blocking calls."""
        successes = 0
        current = shim.get_state()
        assert current is not None
        state, token = current
        for _ in range(ATTEMPTS_PER_WRITER):
            result = shim.set_state(b"%d" % (int(state) + 1), token)
            assert result is not None
            state, token, has_set = result
            successes += has_set
        return successes

    with ThreadPoolExecutor(8) as threads:
        successes = list(threads.map(writer, range(8)))
    final = shim.get_state()
    assert final is not None and int(final[0]) == sum(successes)
    assert sum(successes) >= ATTEMPTS_PER_WRITER
    shim.close()


async def test_conflict_backoff_returns_the_fresh_state_after_its_pause(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "backoff", key_prefix=key_prefix,
                                         conflict_backoff=0.05)
    other = AsyncEtcdRendezvousBackend(etcd_client, "backoff", key_prefix=key_prefix)
    first = await backend.set_state(b"a")
    assert first is not None
    second = await other.set_state(b"b", first[1])
    assert second is not None
    assert await backend.set_state(b"c", first[1]) == (b"b", second[1], False)
    winner = await backend.set_state(b"c", second[1])
    assert winner is not None
    assert winner[0::2] == (b"c", True)


async def test_conflict_backoff_counts_stay_exact_under_contention(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "counter", key_prefix=key_prefix,
                                         conflict_backoff=0.01)
    await backend.set_state(b"0")
    successes = await asyncio.gather(
        *(count_increments(backend, attempts=10) for _ in range(16)))
    assert await counter(backend) == sum(successes)
