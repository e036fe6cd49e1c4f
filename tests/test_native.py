"""The native rendezvous (handler=native) against a real etcd: torch's contract, the
protocol's costs (writes per node, nothing written while training), leaving, outages."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio
from aetcd.utils import prefix_range_end
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousParameters,
    RendezvousTimeoutError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    Deadline,
    EtcdClient,
    EtcdConfig,
    HandlerMismatchError,
    JoinTimeoutError,
    RunClosedError,
    StandbyExitError,
)
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.elastic import create_handler
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native import Admission, AsyncNativeRendezvous, NativeSettings, NodeId
from etcd_rdzv.testing import EtcdCluster, EtcdServer

FAST = {"keep_alive_interval": 0.5, "last_call_timeout": 0.5, "join_timeout": 30}


@pytest.fixture
def run_keys(key_prefix: str) -> RunKeys:
    return RunKeys(f"native-{uuid.uuid4().hex[:8]}", key_prefix)


class Nodes:
    """Native nodes of one run, each on a client of its own, all left at the end."""

    def __init__(self, config: EtcdConfig, keys: RunKeys) -> None:
        self.config, self.keys = config, keys
        self.made: list[AsyncNativeRendezvous] = []
        self.clients: list[EtcdClient] = []

    def add(self, node: NodeId | None = None, **settings: float) -> AsyncNativeRendezvous:
        options = {**FAST, **settings}
        min_nodes = int(options.pop("min_nodes", 1))
        max_nodes = int(options.pop("max_nodes", 8))
        client = EtcdClient(self.config)
        self.clients.append(client)
        rendezvous = AsyncNativeRendezvous(
            client, self.keys, NativeSettings(min_nodes, max_nodes, **options),  # type: ignore[arg-type]
            node)
        self.made.append(rendezvous)
        return rendezvous

    async def close(self) -> None:
        for rendezvous in self.made:
            with contextlib.suppress(Exception):
                await rendezvous.leave()
        for client in self.clients:
            await client.close()


@pytest_asyncio.fixture
async def nodes(etcd_config: EtcdConfig, run_keys: RunKeys) -> AsyncIterator[Nodes]:
    made = Nodes(etcd_config, run_keys)
    yield made
    await made.close()


async def join_all(group: Sequence[AsyncNativeRendezvous]) -> list[Admission]:
    return list(await asyncio.gather(*(node.next_rendezvous() for node in group)))


async def until_someone_waits(member: AsyncNativeRendezvous, seconds: float) -> None:
    """Poll ``num_nodes_waiting()`` as torch's agent does (every 0.1 s) until it is > 0."""
    for _ in range(int(seconds / 0.1)):
        if await member.num_nodes_waiting() > 0:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"num_nodes_waiting() stayed 0 for {seconds} s")


async def revision(client: EtcdClient) -> int:
    return int((await client.get(b"/", Deadline.after(5))).header.revision)


async def writes_under(client: EtcdClient, prefix: bytes, since: int) -> int:
    """How many writes changed keys under ``prefix`` after revision ``since`` (other tests
    share the server, so etcd's global revision counts their writes too)."""
    now = await revision(client)
    seen = 0
    if now > since:
        watch = client.watch(prefix, since + 1, Deadline.after(5),
                             range_end=prefix_range_end(prefix))
        async with contextlib.aclosing(watch) as events:
            while seen < now - since:
                try:
                    event = await asyncio.wait_for(anext(events), 1)
                except asyncio.TimeoutError:
                    break  # the rest of the writes were to other keys
                if event.revision > now:
                    break
                seen += 1
    return seen


async def exists(client: EtcdClient, key: bytes) -> bool:
    return bool((await client.get(key, Deadline.after(5))).kvs)


# --- torch's contract -------------------------------------------------------------------

TRICKY = [NodeId("b", 7, 0), NodeId("a-b", 3, 1), NodeId("a", 10, 0), NodeId("a", 9, 2),
          NodeId("a.b", 1, 0), NodeId("a", 9, 10)]


async def test_ranks_are_torchs_order_of_node_descriptors(nodes: Nodes) -> None:
    group = [nodes.add(node, min_nodes=len(TRICKY), max_nodes=len(TRICKY)) for node in TRICKY]
    admissions = await join_all(group)
    torch_order = sorted(_NodeDesc(n.addr, n.pid, n.local_id) for n in TRICKY)
    expected = {NodeId(d.addr, d.pid, d.local_id): rank for rank, d in enumerate(torch_order)}
    assert {node.node: a.rank for node, a in zip(group, admissions, strict=True)} == expected
    assert {(a.world_size, a.round) for a in admissions} == {(len(TRICKY), 1)}


async def test_a_round_waits_for_the_last_call_once_min_nodes_joined(nodes: Nodes) -> None:
    group = [nodes.add(min_nodes=2, max_nodes=4, last_call_timeout=1) for _ in range(2)]
    admissions = await join_all(group)
    assert sorted(a.rank for a in admissions) == [0, 1]
    assert {a.world_size for a in admissions} == {2}


async def test_join_timeout_raises_and_removes_the_node(nodes: Nodes, etcd_client: EtcdClient,
                                                        run_keys: RunKeys) -> None:
    alone = nodes.add(min_nodes=2, max_nodes=2, join_timeout=1)
    with pytest.raises(JoinTimeoutError, match="join_timeout=1 s"):
        await alone.next_rendezvous()
    response = await etcd_client.get_prefix(run_keys.round_prefix(1), Deadline.after(5))
    assert not response.kvs


async def test_a_closed_run_refuses_joiners_and_is_closed_everywhere(nodes: Nodes) -> None:
    first, second = nodes.add(min_nodes=2, max_nodes=2), nodes.add(min_nodes=2, max_nodes=2)
    await join_all([first, second])
    await first.set_closed()
    assert await second.is_closed()
    with pytest.raises(RunClosedError, match="is closed"):
        await nodes.add(min_nodes=2, max_nodes=2).next_rendezvous()


async def test_a_node_waiting_for_a_round_sees_the_close(nodes: Nodes) -> None:
    waiting = nodes.add(min_nodes=2, max_nodes=2)
    task = asyncio.create_task(waiting.next_rendezvous())
    await asyncio.sleep(0.5)
    await nodes.add(min_nodes=2, max_nodes=2).set_closed()
    with pytest.raises(RunClosedError):
        await asyncio.wait_for(task, 10)


async def test_a_late_node_with_room_makes_the_members_restart(nodes: Nodes) -> None:
    members = [nodes.add(min_nodes=2, max_nodes=3) for _ in range(2)]
    assert {a.world_size for a in await join_all(members)} == {2}
    assert [await m.num_nodes_waiting() for m in members] == [0, 0]
    late = nodes.add(min_nodes=2, max_nodes=3)
    joining = asyncio.create_task(late.next_rendezvous())
    await until_someone_waits(members[0], 10)
    assert await members[1].num_nodes_waiting() == 1
    # What torch's agent does when num_nodes_waiting() > 0: restart, rendezvous again.
    admissions = await join_all(members) + [await asyncio.wait_for(joining, 10)]
    assert sorted(a.rank for a in admissions) == [0, 1, 2]
    assert {(a.world_size, a.round) for a in admissions} == {(3, 2)}


async def test_standbys_beyond_max_nodes_wait_and_join_when_a_member_leaves(
    nodes: Nodes,
) -> None:
    members = [nodes.add(min_nodes=1, max_nodes=2) for _ in range(2)]
    await join_all(members)
    standby = nodes.add(min_nodes=1, max_nodes=2)
    joining = asyncio.create_task(standby.next_rendezvous())
    await asyncio.sleep(1.5)  # three keep-alive ticks: a standby asks nobody to restart
    assert not joining.done()
    assert await members[0].num_nodes_waiting() == 0
    await members[1].leave()
    await until_someone_waits(members[0], 10)
    admissions = [await members[0].next_rendezvous(), await asyncio.wait_for(joining, 10)]
    assert sorted(a.rank for a in admissions) == [0, 1]
    assert {a.world_size for a in admissions} == {2}


async def test_a_standby_exits_gracefully_when_the_run_closes(nodes: Nodes) -> None:
    member = nodes.add(min_nodes=1, max_nodes=1)
    await member.next_rendezvous()
    standby = nodes.add(min_nodes=1, max_nodes=1)
    joining = asyncio.create_task(standby.next_rendezvous())
    await asyncio.sleep(0.5)
    await member.set_closed()
    with pytest.raises(StandbyExitError):
        await asyncio.wait_for(joining, 10)


# --- leaving -------------------------------------------------------------------------------

async def test_leaving_deletes_the_nodes_keys_at_once(nodes: Nodes, etcd_client: EtcdClient,
                                                      run_keys: RunKeys) -> None:
    group = [nodes.add(min_nodes=2, max_nodes=2) for _ in range(2)]
    await join_all(group)
    key = run_keys.member(1, group[1].node.name)
    assert await exists(etcd_client, key)
    await group[1].leave()
    assert not await exists(etcd_client, key)  # revoked, not left to expire


async def test_shutdown_closes_the_run_and_the_others_see_it(nodes: Nodes) -> None:
    group = [nodes.add(min_nodes=2, max_nodes=2) for _ in range(2)]
    await join_all(group)
    assert await group[0].shutdown()
    assert await group[1].is_closed()


def test_a_killed_node_disappears_within_its_lease_ttl(etcd_server: EtcdServer,
                                                       key_prefix: str) -> None:
    from etcd_rdzv.testing.agents import AgentPool, AgentSpec, build_handler, next_rendezvous

    run_id = f"kill-{uuid.uuid4().hex[:8]}"
    spec = AgentSpec(etcd_server.get_endpoint(), run_id, 2, 2,
                     {"key_prefix": key_prefix, "handler": "native", "keep_alive_interval": 1,
                      "keep_alive_max_attempt": 2, "join_timeout": 60})
    keys = RunKeys(run_id, key_prefix)
    with AgentPool(2) as pool:
        pool.call(build_handler, spec, timeout=60)
        pool.call(next_rendezvous, timeout=60)
        assert members(etcd_server, keys, 1) == 2
        pool.kill(1)  # SIGKILL: no revoke, no close
        # The lease's TTL is 1 s x 2; etcd revokes expired leases within about a second more.
        assert wait_for_members(etcd_server, keys, 1, 1, seconds=2 + 5)


def members(server: EtcdServer, keys: RunKeys, round_: int) -> int:
    async def count() -> int:
        async with EtcdClient(server.client_config()) as client:
            response = await client.get_prefix(keys.round_prefix(round_), Deadline.after(5))
            return len(response.kvs)

    return asyncio.run(count())


def wait_for_members(server: EtcdServer, keys: RunKeys, round_: int, expected: int,
                     seconds: float) -> bool:
    import time

    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if members(server, keys, round_) == expected:
            return True
        time.sleep(0.1)
    return False


# --- what it costs etcd ------------------------------------------------------------------------

async def test_a_round_costs_one_write_per_node_and_one_seal(nodes: Nodes,
                                                            etcd_client: EtcdClient) -> None:
    size = 8
    group = [nodes.add(min_nodes=size, max_nodes=size) for _ in range(size)]
    for node in group:
        await node.start()  # leases and the run lease key: once per node's life
    before = await revision(etcd_client)
    await join_all(group)
    # One join Put per node and one seal, plus, once in the run's life, the key of the run
    # lease (taken by the first sealer); the sealer's removal of old seal and wait keys
    # finds nothing to remove in a first round.
    assert await writes_under(etcd_client, nodes.keys.native_prefix, before) == size + 2


async def test_training_writes_nothing_while_nodes_heartbeat(nodes: Nodes,
                                                            etcd_client: EtcdClient) -> None:
    group = [nodes.add(min_nodes=4, max_nodes=4, keep_alive_interval=0.2) for _ in range(4)]
    await join_all(group)
    before = await revision(etcd_client)
    await asyncio.sleep(1.5)  # seven keep-alive rounds of every node
    assert await writes_under(etcd_client, nodes.keys.run_prefix, before) == 0
    assert [await node.num_nodes_waiting() for node in group] == [0] * 4


# --- one run, one protocol; bad settings ---------------------------------------------------------

async def test_a_native_node_refuses_a_torch_run(nodes: Nodes, etcd_client: EtcdClient,
                                                 run_keys: RunKeys) -> None:
    torch_backend = AsyncEtcdRendezvousBackend(etcd_client, run_keys.run_id,
                                               key_prefix=run_keys.key_prefix)
    await torch_backend.set_state(b"torch's state")
    with pytest.raises(HandlerMismatchError, match=r"handler=torch.*handler=native"):
        await nodes.add().next_rendezvous()


def test_a_torch_handler_refuses_a_native_run(etcd_server: EtcdServer, key_prefix: str) -> None:
    run_id = f"mixed-{uuid.uuid4().hex[:8]}"

    def params(handler: str) -> RendezvousParameters:
        return RendezvousParameters("etcd-v3", etcd_server.get_endpoint(), run_id, 1, 1,
                                    local_addr="127.0.0.1", key_prefix=key_prefix,
                                    handler=handler)

    native = create_handler(params("native"))
    native.next_rendezvous()  # the run now has native keys
    try:
        with pytest.raises(RendezvousError, match=r"handler=native.*handler=torch"):
            create_handler(params("torch"))
    finally:
        native.shutdown()


@pytest.mark.parametrize(("settings", "message"), [
    ({"min_nodes": 3, "max_nodes": 2}, r"maximum number of nodes \(2\) must be greater"),
    ({"min_nodes": 0, "max_nodes": 2}, r"min_nodes must be an integer of at least 1"),
    ({"min_nodes": 1, "max_nodes": 1, "keep_alive_interval": "0"},
     r"keep_alive_interval must be a positive number of seconds, got keep_alive_interval='0'"),
    ({"min_nodes": 1, "max_nodes": 1, "join_timeout": "soon"}, r"join_timeout='soon'"),
])
def test_bad_settings_name_the_option(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NativeSettings(**settings)  # type: ignore[arg-type]


def test_an_address_with_a_space_is_refused() -> None:
    with pytest.raises(ValueError, match=r"local_addr='my host'"):
        NodeId("my host", 1, 0)


# --- the torch face -----------------------------------------------------------------------------

@pytest.fixture
def native_params(etcd_server: EtcdServer, key_prefix: str) -> RendezvousParameters:
    return RendezvousParameters(
        "etcd-v3", etcd_server.get_endpoint(), f"face-{uuid.uuid4().hex[:8]}", 2, 2,
        local_addr="127.0.0.1", key_prefix=key_prefix, handler="native", join_timeout="30",
        keep_alive_interval="1")


def test_torchs_agent_gets_ranks_a_store_and_master_addr(
        native_params: RendezvousParameters) -> None:
    handlers = [create_handler(native_params) for _ in range(2)]
    infos: dict[int, object] = {}

    def join(index: int) -> None:
        infos[index] = handlers[index].next_rendezvous()

    threads = [threading.Thread(target=join, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ranks = sorted(info.rank for info in infos.values())  # type: ignore[attr-defined]
    assert ranks == [0, 1]
    stores = {info.bootstrap_store_info.master_port  # type: ignore[attr-defined]
              for info in infos.values()}
    assert len(stores) == 1 and stores != {0}
    info = infos[0]
    info.store.set("k", "v")  # type: ignore[attr-defined]
    assert infos[1].store.get("k") == b"v"  # type: ignore[attr-defined]
    assert handlers[0].get_backend() == "etcd-v3"
    assert handlers[0].num_nodes_waiting() == 0
    # The run's store lives on the run lease, which the nodes renew while they train.
    keys = RunKeys(native_params.run_id, native_params.config["key_prefix"])
    assert store_leases(native_params.endpoint, keys) == {"run"}
    assert handlers[0].shutdown()
    assert handlers[1].is_closed()
    late = create_handler(native_params)
    with pytest.raises(RendezvousClosedError):
        late.next_rendezvous()


def store_leases(endpoint: str, keys: RunKeys) -> set[str]:
    """Which lease each store key is on: "run" (the run lease) or its id."""
    async def read() -> set[str]:
        config = EtcdConfig(endpoints=parse_endpoints(endpoint))
        async with EtcdClient(config) as client:
            run_lease = int((await client.get(keys.run_lease, Deadline.after(5))).kvs[0].value,
                            16)
            store = await client.get_prefix(keys.store_prefix, Deadline.after(5))
            return {"run" if kv.lease == run_lease else f"{kv.lease:x}" for kv in store.kvs}

    return asyncio.run(read())


def test_torchs_agent_gets_its_timeout_error(native_params: RendezvousParameters) -> None:
    native_params.config["join_timeout"] = "1"
    handler = create_handler(native_params)
    with pytest.raises(RendezvousTimeoutError):
        handler.next_rendezvous()
    handler.shutdown()


# --- etcd outages ----------------------------------------------------------------------------

@pytest.mark.slow
async def test_an_etcd_outage_longer_than_the_lease_ttl_stops_nothing(tmp_path: object) -> None:
    with EtcdServer() as server:
        config = server.client_config()
        made = Nodes(config, RunKeys("outage"))
        try:
            settings = {"min_nodes": 2, "max_nodes": 3, "keep_alive_interval": 0.5,
                        "keep_alive_max_attempt": 2}
            members = [made.add(None, **settings) for _ in range(2)]
            assert {a.world_size for a in await join_all(members)} == {2}
            server.kill(0)
            await asyncio.sleep(4)  # four times the lease TTL
            # The agent's poll keeps answering while etcd is away.
            assert [await m.num_nodes_waiting() for m in members] == [0, 0]
            server.restart(0)
            # The leases survived: etcd extends every lease when a leader is elected.
            async with EtcdClient(config) as client:
                response = await client.get_prefix(made.keys.round_prefix(1), Deadline.after(10))
                assert len(response.kvs) == 2
            # And the next membership change works.
            late = made.add(None, **settings)
            joining = asyncio.create_task(late.next_rendezvous())
            await until_someone_waits(members[0], 20)
            admissions = await join_all(members) + [await asyncio.wait_for(joining, 20)]
            assert {a.world_size for a in admissions} == {3}
        finally:
            await made.close()


@pytest.mark.slow
async def test_the_leader_killed_while_16_nodes_join_ranks_each_once() -> None:
    with EtcdCluster(3) as cluster:
        config = cluster.client_config(read_timeout=30, request_timeout=2)
        made = Nodes(config, RunKeys("leader-kill"))
        try:
            group = [made.add(None, min_nodes=16, max_nodes=16, join_timeout=60)
                     for _ in range(16)]
            first = [asyncio.create_task(node.next_rendezvous()) for node in group[:8]]
            await asyncio.sleep(0.3)  # the first half is joining, or has joined
            cluster.kill(cluster.leader_index())
            rest = [asyncio.create_task(node.next_rendezvous()) for node in group[8:]]
            admissions = await asyncio.wait_for(asyncio.gather(*first, *rest), 60)
            assert sorted(a.rank for a in admissions) == list(range(16))
            assert {(a.world_size, a.round) for a in admissions} == {(16, 1)}
        finally:
            await made.close()


async def test_a_node_whose_lease_expired_is_not_ranked_with_the_next_ones(
        nodes: Nodes, etcd_client: EtcdClient, run_keys: RunKeys) -> None:
    first = nodes.add(min_nodes=2, max_nodes=2)
    joining = asyncio.create_task(first.next_rendezvous())
    key = run_keys.member(1, first.node.name)
    for _ in range(50):
        if await exists(etcd_client, key):
            break
        await asyncio.sleep(0.1)
    lease = (await etcd_client.get(key, Deadline.after(5))).kvs[0].lease
    assert await etcd_client.revoke_lease(lease, Deadline.after(5))  # as if it expired
    later = [nodes.add(min_nodes=2, max_nodes=2) for _ in range(2)]
    admissions = await join_all(later)
    assert sorted(a.rank for a in admissions) == [0, 1]
    await asyncio.sleep(1.0)  # the first node notices its lost lease and joins again
    assert not joining.done()  # not ranked in round 1: it stands by for the next round
    await later[0].set_closed()
    with pytest.raises(StandbyExitError):
        await asyncio.wait_for(joining, 10)


async def wait_for_key(client: EtcdClient, key: bytes, seconds: float = 5) -> int:
    """The lease of ``key`` once it exists."""
    for _ in range(int(seconds / 0.05)):
        kvs = (await client.get(key, Deadline.after(5))).kvs
        if kvs:
            return int(kvs[0].lease)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{key!r} did not appear within {seconds} s")


async def test_a_waiting_node_whose_lease_expired_rejoins_its_open_round(
        nodes: Nodes, etcd_client: EtcdClient, run_keys: RunKeys) -> None:
    # Node a waits alone in round 1 (min_nodes 3); its lease expires (revoked from
    # outside). It must put its key in round 1 again: before the fix it re-joined round 1
    # with a Txn that deleted and put the same key, which etcd refuses, and then waited
    # with no key at all while b and c waited for a third node that never came.
    first = nodes.add(min_nodes=3, max_nodes=3)
    joining = asyncio.create_task(first.next_rendezvous())
    key = run_keys.member(1, first.node.name)
    lease = await wait_for_key(etcd_client, key)
    assert await etcd_client.revoke_lease(lease, Deadline.after(5))  # as if it expired
    assert await wait_for_key(etcd_client, key) not in (0, lease)  # back, on a new lease
    others = [nodes.add(min_nodes=3, max_nodes=3) for _ in range(2)]
    admissions = await asyncio.wait_for(join_all(others), 20)
    mine = await asyncio.wait_for(joining, 20)
    assert {a.round for a in [*admissions, mine]} == {1}
    assert sorted(a.rank for a in [*admissions, mine]) == [0, 1, 2]


async def test_the_waiting_marker_lives_on_the_lease_of_the_waiting_nodes_key(
        nodes: Nodes, etcd_client: EtcdClient, run_keys: RunKeys) -> None:
    # A waiting marker written with no lease outlived every node (before the fix: the
    # keep-alive loop could zero the node's lease between its count and its marker).
    members = [nodes.add(min_nodes=2, max_nodes=3) for _ in range(2)]
    await join_all(members)
    late = nodes.add(min_nodes=2, max_nodes=3)
    joining = asyncio.create_task(late.next_rendezvous())
    marker_lease = await wait_for_key(etcd_client, run_keys.waiting(2))
    key_lease = await wait_for_key(etcd_client, run_keys.member(2, late.node.name))
    assert marker_lease == key_lease != 0
    joining.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await joining
    await late.leave()  # revokes its lease: the marker goes with its key
    assert not await exists(etcd_client, run_keys.waiting(2))
    assert await members[0].num_nodes_waiting() == 0


async def test_a_member_whose_lease_expired_is_told_to_restart(
        nodes: Nodes, etcd_client: EtcdClient, run_keys: RunKeys) -> None:
    # Found by the simulation: a member whose lease (and key) expired while it trained was
    # never told, while a standby formed the next round without it: two rounds trained.
    member = nodes.add(min_nodes=1, max_nodes=1)
    admission = await member.next_rendezvous()
    assert await member.num_nodes_waiting() == 0
    lease = await wait_for_key(etcd_client, run_keys.member(admission.round, member.node.name))
    assert await etcd_client.revoke_lease(lease, Deadline.after(5))  # as if it expired
    await until_someone_waits(member, 10)  # within a keep-alive, its agent restarts it
    again = await asyncio.wait_for(member.next_rendezvous(), 20)
    assert again.round == admission.round + 1 and again.rank == 0
