"""The same scenarios through torch's RendezvousHandler interface for both handlers
(handler=torch and handler=native): what torch's agent sees must not depend on the choice."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from torch.distributed.elastic.rendezvous import (
    RendezvousClosedError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
)

from etcd_rdzv.elastic import create_handler
from etcd_rdzv.testing import EtcdServer

HANDLERS = pytest.mark.parametrize("handler", ["torch", "native"])


#: Every handler a test made, shut down after it: torch's handler stops its heartbeat
#: timer only then, and a timer collected on its own thread fails ("cannot join current
#: thread") in whichever test runs at that moment.
_MADE: list[RendezvousHandler] = []


@pytest.fixture(autouse=True)
def _shut_down_every_handler() -> Iterator[None]:
    yield
    made, _MADE[:] = list(_MADE), []
    for handler in made:
        with contextlib.suppress(Exception):
            handler.shutdown()


def handlers(server: EtcdServer, key_prefix: str, handler: str, count: int, *,
             min_nodes: int, max_nodes: int, **options: str) -> list[RendezvousHandler]:
    run_id = f"contract-{uuid.uuid4().hex[:8]}"
    params = RendezvousParameters(
        "etcd-v3", server.get_endpoint(), run_id, min_nodes, max_nodes,
        local_addr="127.0.0.1", key_prefix=key_prefix, handler=handler,
        **{"join_timeout": "30", "last_call_timeout": "1", "keep_alive_interval": "1",
           **options})
    made = [create_handler(params) for _ in range(count)]
    _MADE.extend(made)
    return made


def in_threads(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run each call in a thread of its own; what each returned or raised."""
    outcomes: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            outcomes[index] = calls[index]()
        except Exception as exc:  # the outcome under test
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    return outcomes


def infos(outcomes: list[Any]) -> list[RendezvousInfo]:
    assert all(isinstance(outcome, RendezvousInfo) for outcome in outcomes), outcomes
    return outcomes


@pytest.mark.timeout(120)
@HANDLERS
def test_every_node_gets_one_rank_in_one_world(etcd_server: EtcdServer, key_prefix: str,
                                               handler: str) -> None:
    group = handlers(etcd_server, key_prefix, handler, 4, min_nodes=4, max_nodes=4)
    joined = infos(in_threads([each.next_rendezvous for each in group]))
    assert sorted(info.rank for info in joined) == [0, 1, 2, 3]
    assert {info.world_size for info in joined} == {4}
    # One MASTER_ADDR/PORT for the round, published by rank 0 through the run's store.
    published = {(info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port)
                 for info in joined if info.bootstrap_store_info is not None}
    assert len(published) == 1
    assert [each.num_nodes_waiting() for each in group] == [0] * 4
    assert {each.get_backend() for each in group} == {"etcd-v3"}
    assert group[0].shutdown()


@pytest.mark.timeout(120)
@HANDLERS
def test_the_last_call_completes_a_round_of_min_nodes(etcd_server: EtcdServer,
                                                     key_prefix: str, handler: str) -> None:
    group = handlers(etcd_server, key_prefix, handler, 2, min_nodes=2, max_nodes=3)
    joined = infos(in_threads([each.next_rendezvous for each in group]))
    assert sorted(info.rank for info in joined) == [0, 1]
    assert {info.world_size for info in joined} == {2}
    assert group[0].shutdown()


@pytest.mark.timeout(120)
@HANDLERS
def test_a_lone_node_times_out(etcd_server: EtcdServer, key_prefix: str,
                               handler: str) -> None:
    [alone] = handlers(etcd_server, key_prefix, handler, 1, min_nodes=2, max_nodes=2,
                       join_timeout="2")
    with pytest.raises(RendezvousTimeoutError):
        alone.next_rendezvous()


@pytest.mark.timeout(120)
@HANDLERS
def test_shutdown_closes_the_run_for_everyone(etcd_server: EtcdServer, key_prefix: str,
                                              handler: str) -> None:
    first, second, late = handlers(etcd_server, key_prefix, handler, 3, min_nodes=2,
                                   max_nodes=2)
    infos(in_threads([first.next_rendezvous, second.next_rendezvous]))
    assert first.shutdown()
    # torch's handler serves reads from a 1 s cache; the native one reads etcd.
    assert any(second.is_closed() or threading.Event().wait(0.25) for _ in range(12))
    with pytest.raises(RendezvousClosedError):
        late.next_rendezvous()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler", ["native"])
def test_a_late_node_makes_the_members_restart_into_a_bigger_world(
        etcd_server: EtcdServer, key_prefix: str, handler: str) -> None:
    # handler=torch: the same membership change runs end to end with torchrun's agent in
    # tests/test_torchrun_e2e.py (test_node_lost_then_new_node_admitted); driven by hand
    # here, torch's handler did not admit the late node within a minute, and why is not
    # yet understood (see the closing notes), so only the native handler runs it here.
    # A last call longer than torch's 1 s poll, so that its waiting node is in time too.
    first, second, late = handlers(etcd_server, key_prefix, handler, 3, min_nodes=2,
                                   max_nodes=3, last_call_timeout="4")
    infos(in_threads([first.next_rendezvous, second.next_rendezvous]))
    joining: list[Any] = []
    thread = threading.Thread(target=lambda: joining.append(late.next_rendezvous()))
    thread.start()
    # What torch's agent does: poll num_nodes_waiting(), restart when it is above 0.
    for _ in range(300):
        if first.num_nodes_waiting() > 0:
            break
        threading.Event().wait(0.1)
    assert first.num_nodes_waiting() > 0
    joined = infos(in_threads([first.next_rendezvous, second.next_rendezvous]))
    thread.join(60)
    joined += infos(joining)
    assert sorted(info.rank for info in joined) == [0, 1, 2]
    assert {info.world_size for info in joined} == {3}
    assert first.shutdown()
