"""RendezvousAdmin on native runs (handler=native), against a real etcd with real native
nodes: the roster with ranks, roles, join and seal times, lease times, listing, closing,
deleting, and the watch."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
import pytest_asyncio

from etcd_rdzv import (
    Deadline,
    EtcdClient,
    EtcdConfig,
    RendezvousAdmin,
    RunClosedError,
    StateSnapshot,
)
from etcd_rdzv.admin import NativeEvent, NativeRunView
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native import NodeId
from etcd_rdzv.testing import EtcdServer

from .test_admin import write_run
from .test_native import TRICKY, Nodes, join_all, until_someone_waits


@pytest.fixture
def run_keys(key_prefix: str) -> RunKeys:
    return RunKeys(f"native-{uuid.uuid4().hex[:8]}", key_prefix)


@pytest_asyncio.fixture
async def nodes(etcd_config: EtcdConfig, run_keys: RunKeys) -> AsyncIterator[Nodes]:
    made = Nodes(etcd_config, run_keys)
    yield made
    await made.close()


@pytest.fixture
def admin(etcd_client: EtcdClient, key_prefix: str) -> RendezvousAdmin:
    return RendezvousAdmin(etcd_client, key_prefix)


def roles(view: NativeRunView) -> dict[str, str]:
    assert view.nodes is not None
    return {node.node: node.role for node in view.nodes}


def assert_counts_match_the_nodes(view: NativeRunView) -> None:
    """The figures (kept as keys come and go) agree with the node list (a pass over them)."""
    assert view.nodes is not None
    listed = Counter(node.role for node in view.nodes)
    assert {role: count for role, count in view.counts.items() if count} == dict(listed)


async def status_when(admin: RendezvousAdmin, run_id: str, wanted: dict[str, str],
                      seconds: float = 10) -> NativeRunView:
    """``native_status`` once the nodes have the ``wanted`` roles (they act on a watch, so
    a role changes shortly after what causes it)."""
    view = None
    for _ in range(int(seconds / 0.1)):
        view = await admin.native_status(run_id)
        if view is not None and roles(view) == wanted:
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"the roles stayed {roles(view) if view else None}, not {wanted}")


# --- status ---------------------------------------------------------------------------------

async def test_status_gives_the_roster_by_rank_with_join_times_and_lease_times(
    nodes: Nodes, admin: RendezvousAdmin, run_keys: RunKeys
) -> None:
    assert await admin.native_status(run_keys.run_id) is None
    assert await admin.handler(run_keys.run_id) is None
    group = [nodes.add(node, min_nodes=len(TRICKY), max_nodes=len(TRICKY)) for node in TRICKY]
    admissions = await join_all(group)

    assert await admin.handler(run_keys.run_id) == "native"
    assert await admin.status(run_keys.run_id) is None  # no torch state
    view = await admin.native_status(run_keys.run_id)
    assert view is not None and view.nodes is not None
    assert (view.round, view.world_size, view.state, view.closed) == \
        (1, len(TRICKY), "complete", False)
    # Each node's rank is the one the node itself was admitted with, listed in rank order.
    assert [(node.node, node.rank) for node in view.nodes] == sorted(
        ((str(member.node), admission.rank)
         for member, admission in zip(group, admissions, strict=True)),
        key=lambda pair: pair[1])
    assert {node.role for node in view.nodes} == {"member"}
    assert view.ranks_known
    # Every node joined before the seal, the first when the round started.
    seal = view.seal
    assert seal is not None and seal.size == len(TRICKY) and seal.round == 1
    joined = [node.joined_at for node in view.nodes]
    assert all(at is not None and at <= seal.sealed_at for at in joined)
    assert view.round_started_at == min(at for at in joined if at is not None)
    assert view.round_seconds is not None and view.round_seconds >= 0
    # Each node's lease lives, at most its TTL; the run lease at most ttl.
    node_ttl = group[0].settings.node_ttl
    assert all(node.lease and node.lease_ttl_left is not None
               and 0 <= node.lease_ttl_left <= node_ttl for node in view.nodes)
    assert view.run_lease and view.run_lease_ttl_left is not None
    assert 0 < view.run_lease_ttl_left <= group[0].settings.ttl
    assert {(node.addr, node.pid, node.local_id) for node in view.nodes} == \
        {(node.addr, node.pid, node.local_id) for node in TRICKY}
    data = view.to_dict()
    assert data["nodes_alive"] == len(TRICKY) and data["sealed_by"] == seal.sealer
    assert [node["rank"] for node in data["nodes"]] == list(range(len(TRICKY)))
    assert_counts_match_the_nodes(view)


async def test_standbys_waiting_nodes_and_gone_members(
    nodes: Nodes, admin: RendezvousAdmin, run_keys: RunKeys
) -> None:
    members = [nodes.add(NodeId("m", 1, rank), min_nodes=1, max_nodes=2) for rank in range(2)]
    await join_all(members)
    standby = nodes.add(NodeId("s", 1, 0), min_nodes=1, max_nodes=2)
    joining = asyncio.create_task(standby.next_rendezvous())
    run_id = run_keys.run_id

    view = await status_when(admin, run_id, {"m_1_0": "member", "m_1_1": "member",
                                             "s_1_0": "standby"})
    assert view.nodes is not None
    assert [(node.node, node.round, node.rank) for node in view.nodes] == \
        [("m_1_0", 1, 0), ("m_1_1", 1, 1), ("s_1_0", 2, None)]
    assert view.waiting_rounds == frozenset()
    assert_counts_match_the_nodes(view)

    # A member leaves: it is gone from the roster (rank kept), and the standby now has room:
    # it waits, and asks the members to restart.
    await members[1].leave()
    view = await status_when(admin, run_id, {"m_1_0": "member", "m_1_1": "gone",
                                             "s_1_0": "waiting"})
    assert view.nodes is not None
    gone = next(node for node in view.nodes if node.role == "gone")
    assert (gone.rank, gone.lease, gone.lease_ttl_left) == (1, 0, None)
    assert gone.joined_at is not None  # read from the roster at the cutoff
    assert view.waiting_rounds == frozenset({2})
    assert (view.state, view.nodes_alive) == ("complete", 2)
    assert_counts_match_the_nodes(view)

    # The member restarts, as its agent does: round 2 is sealed with both.
    await until_someone_waits(members[0], 10)
    await asyncio.gather(members[0].next_rendezvous(), asyncio.wait_for(joining, 10))
    view = await status_when(admin, run_id, {"m_1_0": "member", "s_1_0": "member"})
    assert (view.round, view.world_size) == (2, 2)
    assert view.nodes is not None and [node.rank for node in view.nodes] == [0, 1]


async def test_a_round_that_is_not_sealed_yet(nodes: Nodes, admin: RendezvousAdmin,
                                              run_keys: RunKeys) -> None:
    first = nodes.add(NodeId("a", 1, 0), min_nodes=2, max_nodes=2)
    joining = asyncio.create_task(first.next_rendezvous())
    try:
        view = await status_when(admin, run_keys.run_id, {"a_1_0": "joining"})
        assert (view.round, view.seal, view.state, view.world_size) == \
            (None, None, "joining", 0)
        assert view.nodes is not None and view.nodes[0].rank is None
    finally:
        joining.cancel()


async def test_ranks_survive_a_compaction_unless_members_left() -> None:
    # Compaction covers etcd's whole keyspace: this etcd is the test's own.
    with EtcdServer() as server:
        config = server.client_config(read_timeout=5)
        keys = RunKeys("compacted")
        made = Nodes(config, keys)
        try:
            group = [made.add(NodeId("n", 1, index), min_nodes=3, max_nodes=3)
                     for index in range(3)]
            await join_all(group)
            async with EtcdClient(config) as client:
                admin = RendezvousAdmin(client)
                revision = int((await client.get(b"/", Deadline.after(5))).header.revision)
                assert await client.compact(revision, Deadline.after(5))
                # The cutoff is gone from etcd's history; every member still holds its key,
                # so the roster is whole without it.
                view = await admin.native_status("compacted")
                assert view is not None and view.ranks_known and view.nodes is not None
                assert [node.rank for node in view.nodes] == [0, 1, 2]

                await group[0].leave()
                view = await admin.native_status("compacted")
                assert view is not None and not view.ranks_known and view.nodes is not None
                assert {node.rank for node in view.nodes} == {None}
                assert roles(view) == {"n_1_1": "member", "n_1_2": "member"}
        finally:
            await made.close()


# --- list, close, delete ---------------------------------------------------------------------

async def test_list_runs_lists_native_runs_beside_torch_runs(
    nodes: Nodes, admin: RendezvousAdmin, etcd_client: EtcdClient, key_prefix: str,
    run_keys: RunKeys,
) -> None:
    await write_run(etcd_client, key_prefix, "torch-run", nodes=2)
    group = [nodes.add(min_nodes=2, max_nodes=2, ttl=30) for _ in range(2)]
    await join_all(group)

    runs = {run.run_id: run for run in await admin.list_runs()}
    assert runs["torch-run"].handler == "torch" and runs["torch-run"].native is None
    native = runs[run_keys.run_id]
    assert (native.handler, native.revision, native.state, native.error) == \
        ("native", None, None, None)
    assert native.native is not None and native.native.nodes is None  # figures only
    assert (native.native.round, native.native.world_size, native.native.nodes_alive) == \
        (1, 2, 2)
    # Alive while its nodes hold their leases, though training writes nothing.
    assert native.idle_seconds == 0.0
    assert native.ttl_left is not None and 0 < native.ttl_left <= 30
    assert native.native_keys >= 3  # two join keys, the seal, the run lease's key
    data = native.to_dict()
    assert (data["handler"], data["round"], data["world_size"], data["nodes_alive"],
            data["complete"], data["closed"]) == ("native", 1, 2, 2, True, False)

    for node in group:
        await node.leave()
    [after] = [run for run in await admin.list_runs() if run.run_id == run_keys.run_id]
    assert after.native is not None
    assert (after.native.nodes_alive, after.native.state) == (0, "no nodes")
    # Its age is now measured on the run lease, which nobody renews any more.
    assert after.idle_seconds is not None and after.ttl_left is not None


async def test_close_run_closes_a_native_run(nodes: Nodes, admin: RendezvousAdmin,
                                             run_keys: RunKeys) -> None:
    member = nodes.add(min_nodes=1, max_nodes=1)
    await member.next_rendezvous()
    waiting = nodes.add(min_nodes=2, max_nodes=2)
    run_id = run_keys.run_id
    joining = asyncio.create_task(waiting.next_rendezvous())
    await asyncio.sleep(0.5)

    assert await admin.close_run(run_id)
    assert not await admin.close_run(run_id)
    with pytest.raises(RunClosedError):
        await asyncio.wait_for(joining, 10)
    assert await member.is_closed()
    view = await admin.native_status(run_id)
    assert view is not None and (view.state, view.closed_by) == ("closed", "operator")
    with pytest.raises(RunClosedError):
        await nodes.add(min_nodes=1, max_nodes=1).next_rendezvous()


async def test_delete_run_removes_every_native_key(nodes: Nodes, admin: RendezvousAdmin,
                                                   run_keys: RunKeys) -> None:
    group = [nodes.add(min_nodes=2, max_nodes=2) for _ in range(2)]
    await join_all(group)
    [listed] = [run for run in await admin.list_runs() if run.run_id == run_keys.run_id]
    deleted = await admin.delete_run(run_keys.run_id, unchanged_since=listed.last_revision)
    assert deleted == listed.native_keys
    assert await admin.native_status(run_keys.run_id) is None


# --- watch ----------------------------------------------------------------------------------

async def next_change(changes: AsyncIterator[StateSnapshot | NativeEvent],
                      timeout: float = 10) -> StateSnapshot | NativeEvent:
    return await asyncio.wait_for(anext(changes), timeout)


async def native_changes(changes: AsyncIterator[StateSnapshot | NativeEvent], count: int,
                         ) -> list[NativeEvent]:
    events = []
    for _ in range(count):
        event = await next_change(changes)
        assert isinstance(event, NativeEvent)
        events.append(event)
    return events


async def test_watch_run_follows_a_native_run_from_before_its_first_node(
    nodes: Nodes, etcd_config: EtcdConfig, admin: RendezvousAdmin, key_prefix: str,
    run_keys: RunKeys,
) -> None:
    run_id = run_keys.run_id
    async with EtcdClient(etcd_config) as client:
        watcher = RendezvousAdmin(client, key_prefix)
        async with aclosing(watcher.watch_run(run_id)) as changes:
            first = await next_change(changes)
            assert isinstance(first, StateSnapshot) and first.state is None  # nothing yet

            a = nodes.add(NodeId("a", 1, 0), min_nodes=2, max_nodes=2)
            a_joins = asyncio.create_task(a.next_rendezvous())
            [status] = await native_changes(changes, 1)
            # The watch read the run when its first key appeared.
            assert status.change == "status" and status.view.nodes is not None
            assert roles(status.view) == {"a_1_0": "joining"}

            b = nodes.add(NodeId("b", 1, 0), min_nodes=2, max_nodes=2)
            await asyncio.gather(a_joins, b.next_rendezvous())
            joined, sealed = await native_changes(changes, 2)
            assert (joined.change, joined.round, joined.node) == ("joined", 1, "b_1_0")
            assert (sealed.change, sealed.round) == ("sealed", 1)
            assert (sealed.view.state, sealed.view.world_size, sealed.view.counts["member"]) \
                == ("complete", 2, 2)
            assert sealed.view.round_seconds is not None

            await b.leave()
            [left] = await native_changes(changes, 1)
            assert (left.change, left.round, left.node) == ("left", 1, "b_1_0")
            assert (left.view.counts["member"], left.view.counts["gone"]) == (1, 1)

            await admin.close_run(run_id)
            [closed] = await native_changes(changes, 1)
            assert (closed.change, closed.view.state, closed.view.closed_by) == \
                ("closed", "closed", "operator")
            # What the watch kept count of is what a fresh read finds.
            view = await admin.native_status(run_id)
            assert view is not None and view.counts == closed.view.counts


async def test_watch_native_sees_a_late_node_wait_and_the_members_restart(
    nodes: Nodes, admin: RendezvousAdmin, run_keys: RunKeys,
) -> None:
    members = [nodes.add(NodeId("m", 1, index), min_nodes=2, max_nodes=3)
               for index in range(2)]
    await join_all(members)
    async with aclosing(admin.watch_native(run_keys.run_id)) as changes:
        status = await asyncio.wait_for(anext(changes), 10)
        assert status.change == "status" and status.view.nodes is not None
        assert [(node.node, node.rank) for node in status.view.nodes] == \
            [("m_1_0", 0), ("m_1_1", 1)]

        late = nodes.add(NodeId("z", 1, 0), min_nodes=2, max_nodes=3)
        joining = asyncio.create_task(late.next_rendezvous())
        joined, waiting = [await asyncio.wait_for(anext(changes), 10) for _ in range(2)]
        assert (joined.change, joined.node, joined.round) == ("joined", "z_1_0", 2)
        assert (waiting.change, waiting.round, waiting.view.counts["waiting"]) == \
            ("waiting", 2, 1)

        await until_someone_waits(members[0], 10)
        await asyncio.gather(*(member.next_rendezvous() for member in members),
                             asyncio.wait_for(joining, 10))
        seen: list[NativeEvent] = []
        while not seen or seen[-1].change != "sealed":
            seen.append(await asyncio.wait_for(anext(changes), 10))
        # Each member left round 1 and joined round 2; then round 2 was sealed with three.
        moves = Counter((event.change, event.round) for event in seen[:-1])
        assert moves == {("left", 1): 2, ("joined", 2): 2}
        assert (seen[-1].round, seen[-1].view.world_size, seen[-1].view.counts["member"]) \
            == (2, 3, 3)



# --- a ctl/ value this version does not understand --------------------------------------------
# Nodes and operators read ctl/ through one parser (etcd_rdzv.native.ControlView), so a value
# another program wrote is left out by all of them alike, and named as unreadable.

GARBAGE = b"\x00not a seal"


async def scraped(admin: RendezvousAdmin, run_id: str) -> dict[tuple[str, str], float]:
    """The exporter's samples of ``run_id`` in one scrape, by name and role."""
    from etcd_rdzv.exporter import RendezvousCollector

    collector = RendezvousCollector(admin, asyncio.get_running_loop(), scrape_timeout=5)

    def collect() -> dict[tuple[str, str], float]:
        return {(sample.name, sample.labels.get("role", "")): sample.value
                for family in collector.collect() for sample in family.samples
                if sample.labels.get("run_id") == run_id}

    return await asyncio.to_thread(collect)  # collect() blocks its thread on this loop


async def assert_seen_alike(admin: RendezvousAdmin, run_id: str, unreadable: bytes,
                            round_: int | None, members: int) -> None:
    """native_status, list_runs and the exporter agree on the round and its members, and
    name the unreadable key."""
    view = await admin.native_status(run_id)
    assert view is not None
    assert (view.round, view.world_size, view.counts["member"]) == \
        (round_, members, members)
    assert view.unreadable_keys == frozenset({unreadable.decode()})
    assert view.to_dict()["unreadable_keys"] == [unreadable.decode()]
    assert_counts_match_the_nodes(view)
    [listed] = [run for run in await admin.list_runs() if run.run_id == run_id]
    assert (listed.handler, listed.error) == ("native", None)
    assert listed.native is not None
    assert (listed.native.round, listed.native.world_size, listed.native.unreadable_keys) == \
        (round_, members, view.unreadable_keys)
    samples = await scraped(admin, run_id)
    assert samples[("etcd_rdzv_run_round", "")] == (round_ or 0)
    assert samples[("etcd_rdzv_run_world_size", "")] == members
    assert samples[("etcd_rdzv_run_nodes", "participant")] == members
    assert samples[("etcd_rdzv_run_complete", "")] == (1 if members else 0)


async def test_a_malformed_seal_counts_for_nothing_in_status_list_watch_and_exporter(
    admin: RendezvousAdmin, etcd_client: EtcdClient, run_keys: RunKeys,
) -> None:
    run_id = run_keys.run_id
    async with aclosing(admin.watch_run(run_id)) as changes:
        assert isinstance(await next_change(changes), StateSnapshot)  # nothing yet
        await etcd_client.put(run_keys.seal(1), GARBAGE, 0, Deadline.after(5))
        [status] = await native_changes(changes, 1)
        assert status.change == "status" and status.view.round is None
        assert status.view.unreadable_keys == frozenset({run_keys.seal(1).decode()})
        await assert_seen_alike(admin, run_id, run_keys.seal(1), None, 0)

        # Rewritten while watched: still no seal, and no "sealed" event; the next event is
        # the close.
        await etcd_client.put(run_keys.seal(1), GARBAGE + b"!", 0, Deadline.after(5))
        assert await admin.close_run(run_id)
        [closed] = await native_changes(changes, 1)
        assert (closed.change, closed.view.round, closed.view.world_size) == \
            ("closed", None, 0)


async def test_nodes_join_past_a_round_whose_seal_key_is_unreadable(
    nodes: Nodes, admin: RendezvousAdmin, etcd_client: EtcdClient, run_keys: RunKeys,
) -> None:
    # Round 2 can never be sealed (a create-only seal fails on the key): the nodes take it
    # as taken and join past it, while operators count no seal for it.
    await etcd_client.put(run_keys.seal(2), GARBAGE, 0, Deadline.after(5))
    group = [nodes.add(NodeId("n", 1, index), min_nodes=2, max_nodes=2) for index in range(2)]
    admissions = await asyncio.wait_for(join_all(group), 20)
    assert sorted((a.round, a.rank, a.world_size) for a in admissions) == [(3, 0, 2), (3, 1, 2)]
    await assert_seen_alike(admin, run_keys.run_id, run_keys.seal(2), 3, 2)


async def test_nodes_form_a_round_past_a_malformed_seal_of_the_open_round(
    nodes: Nodes, admin: RendezvousAdmin, etcd_client: EtcdClient, run_keys: RunKeys,
) -> None:
    await etcd_client.put(run_keys.seal(1), GARBAGE, 0, Deadline.after(5))
    group = [nodes.add(NodeId("n", 1, index), min_nodes=2, max_nodes=2) for index in range(2)]
    admissions = await asyncio.wait_for(join_all(group), 20)
    assert {(a.world_size, a.rank) for a in admissions} == {(2, 0), (2, 1)}
    [round_] = {a.round for a in admissions}  # round 1, or the next past the bad key
    await assert_seen_alike(admin, run_keys.run_id, run_keys.seal(1), round_, 2)
