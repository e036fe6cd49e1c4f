"""etcd keeps every revision until compacted: the opt-in compaction, the NOSPACE error, and
watches that fall back to a read when their start revision is gone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import uuid

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    CompactedError,
    Deadline,
    EtcdClient,
    EtcdConfig,
    EtcdConnectionError,
)
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.elastic import create_backend
from etcd_rdzv.testing import EtcdCluster, EtcdServer


async def compacted_revision_of(client: EtcdClient, key: bytes) -> bool:
    """Whether reading ``key`` at revision 1 is refused as compacted."""
    try:
        async with contextlib.aclosing(client.watch(key, 1, Deadline.after(5))) as events:
            await asyncio.wait_for(anext(events), 0.5)
    except CompactedError:
        return True
    except asyncio.TimeoutError:
        pass
    return False


async def test_compaction_is_off_by_default() -> None:
    with EtcdServer() as server:  # its own: other tests compact the shared server
        config = EtcdConfig(endpoints=parse_endpoints(server.get_endpoint()))
        async with EtcdClient(config) as client:
            backend = AsyncEtcdRendezvousBackend(client, "run")
            token = None
            for index in range(5):
                result = await backend.set_state(b"%d" % index, token)
                assert result is not None
                token = result[1]
            await asyncio.sleep(1.5)
            assert not await compacted_revision_of(client, backend.key)


async def test_opt_in_compaction_runs_in_the_background() -> None:
    with EtcdServer() as server:
        config = EtcdConfig(endpoints=parse_endpoints(server.get_endpoint()))
        async with EtcdClient(config) as client:
            backend = AsyncEtcdRendezvousBackend(client, "run", compact_interval=1)
            token = None
            deadline = time.monotonic() + 10
            while not await compacted_revision_of(client, backend.key):
                assert time.monotonic() < deadline, "no compaction within 10 s"
                result = await backend.set_state(os.urandom(64), token)
                assert result is not None
                token = result[1]
                await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_nospace_alarm_gives_a_clear_error_naming_the_fix() -> None:
    with EtcdServer(extra_args=["--quota-backend-bytes=4194304"]) as server:
        config = EtcdConfig(endpoints=parse_endpoints(server.get_endpoint()), read_timeout=5)
        async with EtcdClient(config) as client:
            backend = AsyncEtcdRendezvousBackend(client, "run")
            result = await backend.set_state(os.urandom(200_000))
            assert result is not None
            token = result[1]

            async def fill() -> None:
                nonlocal token
                for _ in range(200):  # 200 x 200 KB of history: far past the 4 MiB quota
                    written = await backend.set_state(os.urandom(200_000), token)
                    assert written is not None
                    token = written[1]

            with pytest.raises(EtcdConnectionError) as info:
                await fill()
            message = str(info.value)
            assert "out of space (NOSPACE alarm" in message
            assert "--auto-compaction-retention" in message
            # Reads still work, and the last state written is intact.
            current = await backend.get_state()
            assert current is not None and current[1] == token


async def test_wait_for_change_falls_back_to_a_read_after_compaction(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "run", key_prefix=key_prefix)
    first = await backend.set_state(b"a")
    assert first is not None
    second = await backend.set_state(b"b", first[1])
    assert second is not None
    await etcd_client.compact(second[1], Deadline.after(5))
    # token+1 is compacted away: the watch cannot start there, so it reports a change
    # and the caller re-reads instead of waiting forever.
    assert await backend.wait_for_change(first[1], 5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_store_get_keeps_waiting_across_a_member_loss() -> None:
    with EtcdCluster(3) as cluster:
        params = RendezvousParameters("etcd-v3", cluster.get_endpoint(),
                                      f"watch-{uuid.uuid4().hex[:6]}", 1, 1,
                                      read_timeout="20", request_timeout="1")
        (backend, store), (peer_backend, peer) = create_backend(params), create_backend(params)
        result: dict[str, bytes] = {}
        getter = threading.Thread(target=lambda: result.setdefault("v", store.get("late")))
        getter.start()
        time.sleep(0.5)
        cluster.kill(0)  # the member every client talks to first
        time.sleep(1.0)
        peer.set("late", "value")
        getter.join(timeout=60)
        assert result == {"v": b"value"}
        backend.close()
        peer_backend.close()
