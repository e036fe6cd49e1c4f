"""A 3-member etcd cluster with members killed, restarted and paused under load."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from etcd_rdzv import AsyncEtcdRendezvousBackend, Deadline, EtcdClient, EtcdConfig, TransientError
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdCluster
from etcd_rdzv.testing.agents import run_agents
from etcd_rdzv.testing.faults import Faults
from etcd_rdzv.testing.history import History, run_clients

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(3) as cluster:
        yield cluster


def cluster_config(cluster: EtcdCluster, read_timeout: float = 15.0) -> EtcdConfig:
    return EtcdConfig(endpoints=parse_endpoints(cluster.get_endpoint()),
                      read_timeout=read_timeout, request_timeout=1.0)


@pytest_asyncio.fixture
async def clients(cluster: EtcdCluster) -> AsyncIterator[list[EtcdClient]]:
    """Separate clients (channels), as separate agents would have."""
    made = [EtcdClient(cluster_config(cluster)) for _ in range(16)]
    yield made
    for client in made:
        await client.close()


@pytest.mark.timeout(180)
def test_rendezvous_completes_across_a_leader_kill(cluster: EtcdCluster) -> None:
    run_id = f"leader-kill-{uuid.uuid4().hex[:6]}"
    killed: list[int] = []

    async def state_created() -> bool:
        async with EtcdClient(cluster_config(cluster)) as client:
            backend = AsyncEtcdRendezvousBackend(client, run_id)
            return await backend.wait_for_change(None, 100)

    def kill_leader_mid_rendezvous() -> None:
        # The first agent's write starts the round; torch's 1 s poll keeps it open a while.
        if asyncio.run(state_created()):
            leader = cluster.leader_index()
            cluster.kill(leader)
            killed.append(leader)

    killer = threading.Thread(target=kill_leader_mid_rendezvous)
    killer.start()
    results = run_agents(cluster.get_endpoint(), run_id, 4, timeout=120,
                         options={"request_timeout": "1", "read_timeout": "30"})
    killer.join()
    assert killed, "the leader was never killed"
    assert sorted(r.rank for r in results) == [0, 1, 2, 3]
    assert {r.world_size for r in results} == {4}
    assert len({r.round for r in results}) == 1
    print(f"rendezvous across a leader kill: {max(r.seconds for r in results):.2f} s")


async def test_no_lost_or_duplicated_update_while_members_die_and_return(
    cluster: EtcdCluster, clients: list[EtcdClient]
) -> None:
    backends = [AsyncEtcdRendezvousBackend(c, "counter", key_prefix="/faults")
                for c in clients[:8]]
    await backends[0].set_state(b"0")
    stop = asyncio.Event()

    async def writer(backend: AsyncEtcdRendezvousBackend) -> int:
        successes = 0
        current = await backend.get_state()
        assert current is not None
        state, token = current
        while not stop.is_set():
            result = await backend.set_state(b"%d" % (int(state) + 1), token)
            assert result is not None
            state, token, has_set = result
            successes += has_set
        return successes

    tasks = [asyncio.create_task(writer(b)) for b in backends]
    faults = Faults(cluster)
    await faults.kill_each_in_turn(every=0.7, down_for=0.7)
    stop.set()
    successes = await asyncio.gather(*tasks)
    final = await backends[0].get_state()
    assert final is not None
    assert int(final[0]) == sum(successes) > 0


async def test_a_paused_member_costs_one_attempt_not_the_deadline(
    cluster: EtcdCluster, clients: list[EtcdClient]
) -> None:
    backend = AsyncEtcdRendezvousBackend(clients[0], "paused", key_prefix="/faults")
    first = await backend.set_state(b"a")
    assert first is not None
    cluster.pause(0)  # the first endpoint: where the client is connected
    try:
        started = time.monotonic()
        state = await backend.get_state()
        written = await backend.set_state(b"b", first[1])
        elapsed = time.monotonic() - started
    finally:
        cluster.resume(0)
    assert state == (b"a", first[1])
    assert written is not None and written[2]
    assert elapsed < cluster_config(cluster).read_timeout / 2


@pytest.mark.timeout(180)
async def test_history_under_faults_is_linearizable(
    cluster: EtcdCluster, clients: list[EtcdClient]
) -> None:
    backends = [AsyncEtcdRendezvousBackend(c, "linear", key_prefix="/faults") for c in clients]
    initial = await backends[0].set_state(b"initial")
    assert initial is not None
    history = History()
    faults = Faults(cluster)

    async def inject() -> None:
        await faults.kill_each_in_turn(every=0.8, down_for=0.5)
        # Under the election timeout: the leader is still leader when it resumes.
        await faults.pause_and_resume(None, paused_for=0.6)

    await asyncio.gather(run_clients(history, backends, 7.0, initial[1]), inject())
    violations = history.check(initial=(b"initial", initial[1]))
    counts = history.counts
    print(f"linearizability: {counts}, faults {faults.log}, violations {len(violations)}")
    assert violations == []
    assert counts["successful_sets"] > 50
    assert len(faults.log) == 8


@pytest.mark.timeout(120)
async def test_keep_alives_move_off_a_hung_member_and_the_lease_lives(
        cluster: EtcdCluster) -> None:
    # A follower the client talks to is paused (hung, not dead): its unanswered renewals
    # must move the client to another member before the lease's TTL runs out.
    leader = await asyncio.to_thread(cluster.leader_index)
    hung = (leader + 1) % 3
    order = [hung, *(i for i in range(3) if i != hung)]
    config = EtcdConfig(endpoints=parse_endpoints(
        ",".join(cluster.members[i].endpoint for i in order)), request_timeout=1.0,
        read_timeout=5.0)
    async with EtcdClient(config) as client:
        lease = await client.grant_lease(4, Deadline.after(5))
        cluster.pause(hung)
        try:
            for _ in range(8):  # 8 s, twice the TTL: renew every second, as a node would
                with contextlib.suppress(TransientError):
                    await client.keep_alive(lease, Deadline.after(2))
                await asyncio.sleep(1.0)
            status = await client.lease_status(lease, Deadline.after(5))
        finally:
            cluster.resume(hung)
    assert status.ttl > 0, "the lease expired while its renewals went to a hung member"
