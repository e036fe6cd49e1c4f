"""RendezvousAdmin against real etcd: list, status, watch (across reconnects and compaction),
close (a live torch handler sees it) and delete."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    create_handler as torch_create_handler,
)

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    AsyncEtcdStore,
    Deadline,
    EtcdClient,
    EtcdConfig,
    EtcdStateError,
    RendezvousAdmin,
    RunNotFoundError,
    StateSnapshot,
)
from etcd_rdzv.elastic import create_backend
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.states import WritesMarker, torch_state


def run_store(backend: AsyncEtcdRendezvousBackend, run_id: str, key_prefix: str
              ) -> AsyncEtcdStore:
    """The store of ``run_id``, sharing ``backend``'s client and lease."""
    return AsyncEtcdStore(backend.client, RunKeys(run_id, key_prefix).store_prefix,
                          backend.lease)


async def write_run(client: EtcdClient, key_prefix: str, run_id: str, nodes: int = 2,
                    store_keys: int = 0, ttl: int = 600) -> AsyncEtcdRendezvousBackend:
    backend = AsyncEtcdRendezvousBackend(client, run_id, key_prefix=key_prefix, ttl=ttl)
    assert await backend.set_state(torch_state(nodes)) is not None
    store = run_store(backend, run_id, key_prefix)
    for index in range(store_keys):
        await store.set(f"key{index}", f"value{index}")
    return backend


async def write_states(backend: AsyncEtcdRendezvousBackend, node_counts: Iterable[int],
                       token: int | None = None) -> list[int]:
    """Write a torch state of each node count in turn, each over the last; their revisions."""
    revisions = []
    for nodes in node_counts:
        result = await backend.set_state(torch_state(nodes), token)
        assert result is not None and result[2]
        token = result[1]
        revisions.append(token)
    return revisions


@asynccontextmanager
async def watching(config: EtcdConfig, key_prefix: str, start_revision: int | None = None
                   ) -> AsyncIterator[tuple[EtcdClient, AsyncIterator[StateSnapshot]]]:
    """The snapshots of run ``job``'s state, watched over a client of their own (yielded too,
    for a test that breaks it)."""
    async with EtcdClient(config) as client:
        admin = RendezvousAdmin(client, key_prefix)
        async with aclosing(admin.watch_state("job", start_revision=start_revision)) \
                as snapshots:
            yield client, snapshots


async def next_snapshot(iterator: AsyncIterator[StateSnapshot],
                        timeout: float = 10.0) -> StateSnapshot:
    return await asyncio.wait_for(iterator.__anext__(), timeout)


# --- list, status, snapshot -------------------------------------------------------------------

async def test_list_runs_reports_each_run_with_revision_lease_and_size(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    admin = RendezvousAdmin(etcd_client, key_prefix)
    assert await admin.list_runs() == []

    backend = await write_run(etcd_client, key_prefix, "alpha", nodes=3, store_keys=2)
    await write_run(etcd_client, key_prefix, "beta", nodes=1)
    # Store keys without a state (the state was deleted first), and keys of another layout.
    await run_store(backend, "gamma", key_prefix).set("k", "v")
    deadline = Deadline.after(5)
    await etcd_client.put(f"{key_prefix}/team/nested/other".encode(), b"x", 0, deadline)

    runs = {run.run_id: run for run in await admin.list_runs()}
    assert sorted(runs) == ["alpha", "beta", "gamma"]

    alpha = runs["alpha"]
    current = await backend.get_state()
    assert current is not None
    assert alpha.revision == current[1]
    assert alpha.version == 1 and alpha.created_revision == alpha.revision
    assert alpha.store_keys == 2 and alpha.store_bytes == len("value0") + len("value1")
    assert alpha.last_revision > alpha.revision  # the store keys came after the state
    assert alpha.lease != 0 and alpha.state_bytes > len(torch_state(3)) // 2
    assert alpha.state is not None and alpha.state.world_size == 3 and alpha.error is None
    # Just written: idle ~0 s, and the keys live ttl to ttl + the lease window.
    assert alpha.idle_seconds is not None and alpha.idle_seconds < 5
    assert alpha.ttl_left is not None and 600 <= alpha.ttl_left <= 600 + backend.lease.window

    gamma = runs["gamma"]
    assert gamma.revision is None and gamma.state is None and gamma.store_keys == 1
    assert runs["beta"].to_dict()["world_size"] == 1


async def test_list_runs_flags_a_state_it_cannot_decode(
    etcd_client: EtcdClient, key_prefix: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    backend = AsyncEtcdRendezvousBackend(etcd_client, "evil", key_prefix=key_prefix)
    await backend.set_state(pickle.dumps(WritesMarker(marker)))
    admin = RendezvousAdmin(etcd_client, key_prefix)

    [run] = await admin.list_runs()
    assert run.state is None and run.error is not None and "builtins.exec" in run.error
    with pytest.raises(EtcdStateError, match=r"builtins\.exec"):
        await admin.status("evil")
    with pytest.raises(EtcdStateError, match=r"builtins\.exec"):
        await admin.close_run("evil")
    assert not marker.exists()


async def test_status_and_snapshot(etcd_client: EtcdClient, key_prefix: str) -> None:
    admin = RendezvousAdmin(etcd_client, key_prefix)
    assert await admin.status("missing") is None
    empty = await admin.snapshot("missing")
    assert empty.state is None and empty.revision > 0

    backend = await write_run(etcd_client, key_prefix, "job", nodes=4)
    view = await admin.status("job")
    assert view is not None and view.world_size == 4 and view.round == 7
    snapshot = await admin.snapshot("job")
    current = await backend.get_state()
    assert current is not None and snapshot.revision == current[1]
    assert snapshot.lease != 0 and snapshot.stored_bytes > 0
    with pytest.raises(ValueError, match="run id"):
        await admin.status("a/b")


# --- watch --------------------------------------------------------------------------------------

async def test_watch_yields_the_state_then_each_change_in_order(
    etcd_client: EtcdClient, etcd_config: EtcdConfig, key_prefix: str
) -> None:
    backend = AsyncEtcdRendezvousBackend(etcd_client, "job", key_prefix=key_prefix)
    async with watching(etcd_config, key_prefix) as (_, snapshots):
        first = await next_snapshot(snapshots)
        assert first.state is None  # not created yet

        revisions = await write_states(backend, (1, 2, 3))
        seen = [await next_snapshot(snapshots) for _ in range(3)]
        assert [s.revision for s in seen] == revisions
        assert [s.state.world_size for s in seen if s.state is not None] == [1, 2, 3]

        await RendezvousAdmin(etcd_client, key_prefix).delete_run("job")
        deleted = await next_snapshot(snapshots)
        assert deleted.state is None and deleted.revision > revisions[-1]


async def test_watch_resumes_after_the_stream_breaks_without_losing_or_repeating(
    etcd_client: EtcdClient, etcd_config: EtcdConfig, key_prefix: str
) -> None:
    backend = await write_run(etcd_client, key_prefix, "job", nodes=1)
    async with watching(etcd_config, key_prefix) as (watch_client, snapshots):
        first = await next_snapshot(snapshots)
        assert first.state is not None and first.state.world_size == 1
        # Close the watch's channel under it: the stream breaks (CANCELLED/UNAVAILABLE),
        # and the watch must come back from the revision after the last one it yielded.
        await watch_client.close()
        revisions = await write_states(backend, (2, 3, 4, 5), first.revision)
        seen = [await next_snapshot(snapshots) for _ in range(4)]
        assert [s.revision for s in seen] == revisions
        assert [s.state.world_size for s in seen if s.state is not None] == [2, 3, 4, 5]


async def test_watch_survives_an_etcd_restart() -> None:
    with EtcdServer() as server:
        config = server.client_config(read_timeout=5, request_timeout=1)
        async with EtcdClient(config) as writer, watching(config, "/restart") as (_, snapshots):
            backend = await write_run(writer, "/restart", "job", nodes=1)
            first = await next_snapshot(snapshots)
            server.kill(0)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.restart, 0)
            [revision] = await write_states(backend, (2,), first.revision)
            after = await next_snapshot(snapshots, timeout=30)
            assert after.revision == revision
            assert after.state is not None and after.state.world_size == 2


async def test_watch_falls_back_to_a_read_when_history_is_compacted() -> None:
    # Compaction covers etcd's whole keyspace: this etcd is the test's own.
    with EtcdServer() as server:
        config = server.client_config(read_timeout=5)
        async with EtcdClient(config) as client:
            backend = AsyncEtcdRendezvousBackend(client, "job", key_prefix="/compacted")
            first, _, token = await write_states(backend, (1, 2, 3))
            assert await client.compact(token, Deadline.after(5))
            # Resuming after the first write: that history is gone, so the state is read.
            async with watching(config, "/compacted", first + 1) as (_, snapshots):
                current = await next_snapshot(snapshots)
                assert current.revision == token
                assert current.state is not None and current.state.world_size == 3
                [revision] = await write_states(backend, (4,), token)
                assert (await next_snapshot(snapshots)).revision == revision


# --- close --------------------------------------------------------------------------------------

def test_close_run_makes_a_live_torch_handler_see_it_closed(
    etcd_server: EtcdServer, etcd_config: EtcdConfig, key_prefix: str
) -> None:
    run_id = "job"
    params = RendezvousParameters(
        backend="etcd-v3", endpoint=etcd_server.get_endpoint(), run_id=run_id, min_nodes=1,
        max_nodes=1, local_addr="127.0.0.1", key_prefix=key_prefix, read_timeout="10",
    )
    backend, store = create_backend(params)
    handler = torch_create_handler(store, backend, params)
    try:
        info = handler.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert not handler.is_closed()

        async def close() -> tuple[bool, bool, Any]:
            async with EtcdClient(etcd_config) as client:
                admin = RendezvousAdmin(client, key_prefix)
                before = await admin.status(run_id)
                closed = await admin.close_run(run_id)
                again = await admin.close_run(run_id)
                return closed, again, before

        closed, again, before = asyncio.run(close())
        assert before is not None and not before.closed and before.world_size == 1
        assert (closed, again) == (True, False)

        # torch caches its state for up to 1 s; within a few seconds it reads etcd again.
        deadline = time.monotonic() + 10
        while not handler.is_closed():
            assert time.monotonic() < deadline, "the handler never saw the rendezvous closed"
            time.sleep(0.2)
        # And a node that tries to join now is turned away, as after torch's set_closed().
        late = torch_create_handler(store, backend, params)
        with pytest.raises(RendezvousClosedError):
            late.next_rendezvous()
    finally:
        handler.shutdown()
        backend.close()


async def test_close_run_retries_when_agents_keep_writing(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    """Writers rewrite the state (read, modify, CAS) as torch's heartbeats do; closing wins
    anyway, and the writers, which keep what they read, keep it closed."""
    run_id = "job"
    await write_run(etcd_client, key_prefix, run_id, nodes=4)
    stop = asyncio.Event()
    writes = 0

    async def heartbeat() -> None:
        nonlocal writes
        backend = AsyncEtcdRendezvousBackend(etcd_client, run_id, key_prefix=key_prefix)
        while not stop.is_set():
            current = await backend.get_state()
            assert current is not None
            state = pickle.loads(current[0])  # torch's own state, as the handler loads it
            state.round += 0
            result = await backend.set_state(pickle.dumps(state), current[1])
            if result is not None and result[2]:
                writes += 1

    writers = [asyncio.create_task(heartbeat()) for _ in range(4)]
    try:
        await asyncio.sleep(0.2)
        assert await RendezvousAdmin(etcd_client, key_prefix).close_run(run_id)
        await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*writers)
    assert writes > 4
    view = await RendezvousAdmin(etcd_client, key_prefix).status(run_id)
    assert view is not None and view.closed and view.world_size == 4


async def test_close_run_of_a_missing_run(etcd_client: EtcdClient, key_prefix: str) -> None:
    with pytest.raises(RunNotFoundError, match="no rendezvous state"):
        await RendezvousAdmin(etcd_client, key_prefix).close_run("missing")


# --- delete -------------------------------------------------------------------------------------

async def test_delete_run_removes_state_and_store_and_nothing_else(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    await write_run(etcd_client, key_prefix, "a", store_keys=3)
    await write_run(etcd_client, key_prefix, "ab", store_keys=1)  # a prefix of "a" + more
    admin = RendezvousAdmin(etcd_client, key_prefix)

    assert await admin.delete_run("a") == 4
    assert await admin.delete_run("a") == 0
    runs = await admin.list_runs()
    assert [(run.run_id, run.store_keys) for run in runs] == [("ab", 1)]


async def test_delete_run_keeps_a_run_written_since_the_listing(
    etcd_client: EtcdClient, key_prefix: str
) -> None:
    backend = await write_run(etcd_client, key_prefix, "job", store_keys=1)
    admin = RendezvousAdmin(etcd_client, key_prefix)
    [listed] = await admin.list_runs()

    await run_store(backend, "job", key_prefix).set("late", "write")
    assert await admin.delete_run("job", unchanged_since=listed.last_revision) is None
    assert (await admin.status("job")) is not None

    [again] = await admin.list_runs()
    assert await admin.delete_run("job", unchanged_since=again.last_revision) == 3
    assert await admin.list_runs() == []
