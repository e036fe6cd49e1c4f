"""torch's own DynamicRendezvousHandler, in four processes, over the etcd-v3 plug-in; the agent
harness (:mod:`etcd_rdzv.testing.agents`) when agents fail."""

from __future__ import annotations

import multiprocessing
import uuid

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    create_handler as torch_create_handler,
)

from etcd_rdzv.elastic import create_backend
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.agents import LOCAL_ADDR, AgentError, run_agents

AGENTS = 4


@pytest.mark.timeout(120)
def test_four_agents_meet_in_one_round(etcd_server: EtcdServer, key_prefix: str) -> None:
    endpoint = etcd_server.get_endpoint()
    run_id = f"test-{uuid.uuid4().hex}"

    # Each agent: etcd_rdzv.elastic.create_handler -> next_rendezvous -> (all in) -> shutdown.
    results = run_agents(endpoint, run_id, AGENTS, timeout=60.0,
                         options={"key_prefix": key_prefix})

    assert sorted(result.rank for result in results) == list(range(AGENTS))
    assert [result.world_size for result in results] == [AGENTS] * AGENTS
    assert len({result.round for result in results}) == 1
    assert len({result.pid for result in results}) == AGENTS
    # Rank 0 published MASTER_ADDR/MASTER_PORT through the etcd store; every rank read it.
    assert len({(result.master_addr, result.master_port) for result in results}) == 1
    assert results[0].master_addr == LOCAL_ADDR
    assert all(result.shut_down for result in results)

    # The shutdown closed the rendezvous, as another handler of the same run sees in etcd.
    params = RendezvousParameters(backend="etcd-v3", endpoint=endpoint, run_id=run_id,
                                  min_nodes=AGENTS, max_nodes=AGENTS, local_addr=LOCAL_ADDR,
                                  key_prefix=key_prefix)
    backend, store = create_backend(params)
    try:
        assert torch_create_handler(store, backend, params).is_closed()
    finally:
        backend.close()


def test_failing_agents_fail_the_run_and_leave_no_process(etcd_server: EtcdServer,
                                                          key_prefix: str) -> None:
    with pytest.raises(AgentError) as info:
        run_agents(etcd_server.get_endpoint(), f"test-{uuid.uuid4().hex}", 2, timeout=60.0,
                   options={"key_prefix": key_prefix, "join_timeout": "soon"})

    # Each agent's own traceback: torch refused the option while building the handler.
    assert sorted(info.value.failures) == [0, 1]
    assert all("join_timeout" in text for text in info.value.failures.values())
    assert multiprocessing.active_children() == []
