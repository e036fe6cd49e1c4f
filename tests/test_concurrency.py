"""Many writers on one state: every successful CAS counts exactly once."""

from __future__ import annotations

import asyncio
import threading

from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, EtcdConfig
from etcd_rdzv.elastic import EtcdRendezvousBackend

ATTEMPTS_PER_WRITER = 25


async def increment(backend: AsyncEtcdRendezvousBackend, attempts: int) -> int:
    """Try ``attempts`` CAS increments of the counter in the state; return the successes."""
    successes = 0
    current = await backend.get_state()
    assert current is not None
    state, token = current
    for _ in range(attempts):
        result = await backend.set_state(b"%d" % (int(state) + 1), token)
        assert result is not None
        state, token, has_set = result
        successes += has_set
    return successes


async def test_32_asyncio_tasks_count_exactly_their_successes(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "counter", key_prefix=key_prefix)
    await backend.set_state(b"0")
    successes = await asyncio.gather(
        *(increment(backend, ATTEMPTS_PER_WRITER) for _ in range(32)))
    final = await backend.get_state()
    assert final is not None
    assert int(final[0]) == sum(successes)
    assert sum(successes) >= ATTEMPTS_PER_WRITER  # someone always wins a round


def test_8_threads_through_the_shim_count_exactly_their_successes(
    etcd_config: EtcdConfig, key_prefix: str
) -> None:
    backend = EtcdRendezvousBackend(
        AsyncEtcdRendezvousBackend(EtcdClient(etcd_config), "counter", key_prefix=key_prefix))
    backend.set_state(b"0")
    successes: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            count = 0
            current = backend.get_state()
            assert current is not None
            state, token = current
            for _ in range(ATTEMPTS_PER_WRITER):
                result = backend.set_state(b"%d" % (int(state) + 1), token)
                assert result is not None
                state, token, has_set = result
                count += has_set
            successes.append(count)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    final = backend.get_state()
    assert final is not None
    assert int(final[0]) == sum(successes)
    assert sum(successes) >= ATTEMPTS_PER_WRITER
    backend.close()


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
    successes = await asyncio.gather(*(increment(backend, 10) for _ in range(16)))
    final = await backend.get_state()
    assert final is not None
    assert int(final[0]) == sum(successes)
