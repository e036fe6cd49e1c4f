"""``wait=watch``: torch's handler waking on etcd watches behaves as torch's stock one.

Agents run as separate processes (:mod:`etcd_rdzv.testing.agents`), each with torch's real
handler over a real etcd; nothing here checks a duration. Stock (``wait=poll``) and fast
(``wait=watch``) agents must see the same outcome: in separate runs of 2 and 8 agents, and
within one run for the close and the join timeout.
"""

from __future__ import annotations

import contextlib
import pickle
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import torch
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousParameters
from torch.distributed.elastic.rendezvous import dynamic_rendezvous as torch_dr
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

from etcd_rdzv.elastic import create_backend, create_handler, fast_handler
from etcd_rdzv.elastic.fast_handler import (
    MAX_WAIT,
    FastHandlerUnavailableWarning,
    WatchingRendezvousOpExecutor,
    is_fast_handler,
)
from etcd_rdzv.elastic.torch_handler import OutageTolerantRendezvousHandler
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.agents import (
    LOCAL_ADDR,
    AgentPool,
    AgentResult,
    AgentSpec,
    RendezvousFailed,
    build_handler,
    next_rendezvous,
    run_agents,
    shutdown_handler,
)

#: A bound on every wait of the scenarios below, never reached when things work.
SCENARIO_TIMEOUT = 90.0


def make_params(endpoint: str, run_id: str, key_prefix: str, *, min_nodes: int = 1,
                max_nodes: int = 1, **options: Any) -> RendezvousParameters:
    return RendezvousParameters(backend="etcd-v3", endpoint=endpoint, run_id=run_id,
                                min_nodes=min_nodes, max_nodes=max_nodes,
                                local_addr=LOCAL_ADDR, key_prefix=key_prefix, **options)


def dynamic_handler(params: RendezvousParameters) -> DynamicRendezvousHandler:
    """The plug-in's handler: torch's class, made outage-tolerant (fast or not)."""
    handler = create_handler(params)
    assert type(handler) is OutageTolerantRendezvousHandler
    assert isinstance(handler, DynamicRendezvousHandler)
    return handler


def new_run_id() -> str:
    return f"fast-{uuid.uuid4().hex[:10]}"


# --- agents in processes -------------------------------------------------------------------


def worlds(outcomes: list[Any]) -> list[tuple[int, int, int]]:
    """(rank, world size, round) of each agent; fails on an agent whose rendezvous failed."""
    assert all(isinstance(o, AgentResult) for o in outcomes), outcomes
    return [(o.rank, o.world_size, o.round) for o in outcomes]


def participants(endpoint: str, run_id: str, key_prefix: str, *, at_least: int = 0) -> int:
    """How many nodes the run's current round has, read from etcd as torch stores it.

    With ``at_least``, reads again until there are that many (within SCENARIO_TIMEOUT).
    """
    backend, _ = create_backend(make_params(endpoint, run_id, key_prefix))
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    try:
        while True:
            current = backend.get_state()
            count = 0 if current is None else len(pickle.loads(current[0]).participants)
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.05)
    finally:
        backend.close()


# --- the rendezvous as torch's stock handler does it ---------------------------------------


def outcome(results: list[AgentResult]) -> dict[str, Any]:
    """What must not depend on how agents wait: ranks, their order, world sizes, rounds."""
    by_node = sorted(results, key=lambda result: result.pid)  # torch ranks sorted nodes
    return {
        "ranks": sorted(result.rank for result in results),
        "ranks in node order": [result.rank for result in by_node],
        "world sizes": {result.world_size for result in results},
        "rounds": {result.round for result in results},
        "masters": len({(result.master_addr, result.master_port) for result in results}),
        "shut down": all(result.shut_down for result in results),
    }


def stock_outcome(n: int) -> dict[str, Any]:
    """What torch's stock handler gives n agents started together on a fresh run."""
    return {"ranks": list(range(n)), "ranks in node order": list(range(n)),
            "world sizes": {n}, "rounds": {0}, "masters": 1, "shut down": True}


# Stock agents run beside fast ones at 2 and 8; at 4 tests/test_dynamic_rendezvous.py runs
# them (same checks), which keeps this file's process count down.
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("n", "waits"), [
    pytest.param(2, ("poll", "watch"), id="2-stock-and-fast"),
    pytest.param(4, ("watch",), id="4-fast"),
    pytest.param(8, ("watch",), id="8-fast"),  # stock at 8 is what stock_outcome states
])
def test_same_ranks_rounds_and_world_sizes_as_stock(etcd_server: EtcdServer, key_prefix: str,
                                                    n: int, waits: tuple[str, ...]) -> None:
    endpoint = etcd_server.get_endpoint()
    seen = {
        wait: outcome(run_agents(endpoint, new_run_id(), n, timeout=SCENARIO_TIMEOUT,
                                 options={"key_prefix": key_prefix, "wait": wait}))
        for wait in waits
    }

    assert seen == dict.fromkeys(waits, stock_outcome(n))


def test_a_node_leaving_leads_to_a_smaller_next_round(etcd_server: EtcdServer,
                                                      key_prefix: str) -> None:
    victim, survivors = 2, [0, 1]
    # A dead node is dropped 3 s after its last heartbeat; a round of 2 closes after the
    # 3 s last call, one of 3 at once.
    spec = AgentSpec(etcd_server.get_endpoint(), new_run_id(), 2, 3, {
        "key_prefix": key_prefix, "wait": "watch", "keep_alive_interval": 1,
        "keep_alive_max_attempt": 3, "last_call_timeout": 3, "join_timeout": 60})
    with AgentPool(3) as pool:
        setups = pool.call(build_handler, spec)
        assert [setup.fast_handler for setup in setups] == [True] * 3

        first = worlds(pool.call(next_rendezvous, timeout=SCENARIO_TIMEOUT))
        assert sorted(rank for rank, _, _ in first) == [0, 1, 2]
        assert {(world, round_) for _, world, round_ in first} == {(3, 0)}

        # Once everyone has seen the complete round, the victim dies: no shutdown, no heartbeat.
        pool.kill(victim)
        following = worlds(pool.call(next_rendezvous, workers=survivors,
                                      timeout=SCENARIO_TIMEOUT))
        assert sorted(rank for rank, _, _ in following) == [0, 1]
        assert {(world, round_) for _, world, round_ in following} == {(2, 1)}
        assert pool.call(shutdown_handler, workers=survivors) == [True, True]


@contextlib.contextmanager
def waiting_agents(endpoint: str, run_id: str, options: dict[str, object]
                   ) -> Iterator[AgentPool]:
    """A fast (worker 0) and a stock (worker 1) agent in ``next_rendezvous`` for a round of 3
    that cannot complete; gather their outcomes from the pool."""
    with AgentPool(2) as pool:
        for worker, wait in ((0, "watch"), (1, "poll")):
            spec = AgentSpec(endpoint, run_id, 3, 3, {**options, "wait": wait})
            pool.submit(build_handler, spec, workers=[worker])
        assert [setup.fast_handler for setup in pool.gather()] == [True, False]
        pool.submit(next_rendezvous)
        yield pool


def failures(outcomes: list[Any]) -> list[str]:
    assert all(isinstance(o, RendezvousFailed) for o in outcomes), outcomes
    return [o.error for o in outcomes]


def test_closing_wakes_waiting_agents_with_closed_error(etcd_server: EtcdServer,
                                                        key_prefix: str) -> None:
    endpoint, run_id = etcd_server.get_endpoint(), new_run_id()
    options: dict[str, object] = {"key_prefix": key_prefix, "join_timeout": 60}
    with waiting_agents(endpoint, run_id, options) as pool:
        assert participants(endpoint, run_id, key_prefix, at_least=2) == 2

        params = make_params(endpoint, run_id, key_prefix, min_nodes=3, max_nodes=3,
                             wait="watch")
        closer = dynamic_handler(params)
        assert is_fast_handler(closer)
        closer.set_closed()

        assert failures(pool.gather(timeout=SCENARIO_TIMEOUT)) == ["RendezvousClosedError"] * 2
    assert closer.is_closed()
    late = dynamic_handler(params)
    with pytest.raises(RendezvousClosedError):
        late.next_rendezvous()


def test_join_timeout_raises_the_same_error_as_stock(etcd_server: EtcdServer,
                                                     key_prefix: str) -> None:
    endpoint, run_id = etcd_server.get_endpoint(), new_run_id()
    options: dict[str, object] = {"key_prefix": key_prefix, "join_timeout": 2}
    with waiting_agents(endpoint, run_id, options) as pool:
        assert failures(pool.gather(timeout=SCENARIO_TIMEOUT)) == ["RendezvousTimeoutError"] * 2
    # Both rolled themselves back out of the round on their way out.
    assert participants(endpoint, run_id, key_prefix) == 0


# --- in this process -----------------------------------------------------------------------


def test_wait_watch_builds_the_fast_handler_and_poll_the_stock_one(
    etcd_server: EtcdServer, key_prefix: str
) -> None:
    endpoint = etcd_server.get_endpoint()
    options: dict[str, Any] = {"join_timeout": "7", "last_call_timeout": "3",
                               "keep_alive_interval": "2"}
    fast = dynamic_handler(make_params(endpoint, new_run_id(), key_prefix, wait="watch",
                                      **options))
    stock = dynamic_handler(make_params(endpoint, new_run_id(), key_prefix, **options))
    explicit = dynamic_handler(make_params(endpoint, new_run_id(), key_prefix, wait="poll"))

    assert type(fast) is OutageTolerantRendezvousHandler
    assert is_fast_handler(fast) and isinstance(fast._op_executor, WatchingRendezvousOpExecutor)
    assert not is_fast_handler(stock) and not is_fast_handler(explicit)
    assert type(stock._op_executor) is torch_dr._DistributedRendezvousOpExecutor
    # torch parsed the options of both alike.
    for handler in (fast, stock):
        assert handler.settings.timeout.join == timedelta(seconds=7)
        assert handler.settings.timeout.last_call == timedelta(seconds=3)
        assert handler.settings.keep_alive_interval == timedelta(seconds=2)


@pytest.mark.parametrize("wait", ["poll", "watch"])
def test_an_option_torch_refuses_raises_torchs_error(etcd_server: EtcdServer, key_prefix: str,
                                                     wait: str) -> None:
    params = make_params(etcd_server.get_endpoint(), new_run_id(), key_prefix, wait=wait,
                         join_timeout="soon")
    with pytest.raises(ValueError, match="'join_timeout' does not represent a valid integer"):
        create_handler(params)


def test_torch_is_left_untouched(etcd_server: EtcdServer, key_prefix: str) -> None:
    before = dict(vars(torch_dr))
    handler = dynamic_handler(make_params(etcd_server.get_endpoint(), new_run_id(), key_prefix,
                                         wait="watch"))
    assert is_fast_handler(handler)
    handler.next_rendezvous()  # one node: complete at once
    assert handler.shutdown()
    after = vars(torch_dr)
    assert before.keys() == after.keys()
    assert all(after[name] is value for name, value in before.items())


def test_one_node_rendezvous_and_close(etcd_server: EtcdServer, key_prefix: str) -> None:
    params = make_params(etcd_server.get_endpoint(), new_run_id(), key_prefix, wait="watch")
    handler = dynamic_handler(params)
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1)
    assert handler.num_nodes_waiting() == 0
    assert not handler.is_closed()
    assert handler.shutdown()
    assert dynamic_handler(params).is_closed()


def test_each_wait_ends_by_the_deadline_and_within_max_wait(etcd_server: EtcdServer,
                                                             key_prefix: str) -> None:
    handler = dynamic_handler(make_params(etcd_server.get_endpoint(), new_run_id(), key_prefix,
                                         wait="watch", keep_alive_interval="5"))
    executor = handler._op_executor
    assert isinstance(executor, WatchingRendezvousOpExecutor)
    state = torch_dr._RendezvousState()
    now = time.monotonic()

    assert 0 < executor._wait_seconds(state, now + 60) <= MAX_WAIT
    assert executor._wait_seconds(state, now + 0.2) <= 0.2
    # Past the operation's deadline (a redundant node waits on): still bounded.
    assert 0 < executor._wait_seconds(state, now - 5) <= MAX_WAIT
    # The round's last call ends sooner than the operation.
    state.deadline = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    assert executor._wait_seconds(state, now + 60) <= 0.3 + 0.05
    # This node's next heartbeat is due sooner still.
    state.last_heartbeats[handler._this_node] = datetime.now(timezone.utc) - timedelta(
        seconds=4.9)
    assert executor._wait_seconds(state, now + 60) <= 0.1 + 0.05


@pytest.fixture
def fresh_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_handler, "_warned", False)


class _OtherExecutor(torch_dr._DistributedRendezvousOpExecutor):
    """What another library might have put in torch's place."""


def _old_run(self: Any, state_handler: Any, deadline: float) -> None:
    raise AssertionError("never called")


def _holder_init_without_cache(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_holder_init(self, *args, **kwargs)
    del self._last_sync_time


_original_holder_init = torch_dr._BackendRendezvousStateHolder.__init__

#: Ways torch's private names could stop matching, each (how, a word the warning says).
_MISMATCHES: dict[str, tuple[Callable[[pytest.MonkeyPatch], None], str]] = {
    "context gone": (lambda mp: mp.delattr(torch_dr, "_RendezvousContext"),
                     "_RendezvousContext"),
    "action gone": (lambda mp: mp.delattr(torch_dr, "_Action"), "_Action"),
    "executor replaced": (lambda mp: mp.setattr(torch_dr, "_DistributedRendezvousOpExecutor",
                                                _OtherExecutor),
                          "_DistributedRendezvousOpExecutor"),
    "run signature": (lambda mp: mp.setattr(torch_dr._DistributedRendezvousOpExecutor, "run",
                                            _old_run),
                      "_DistributedRendezvousOpExecutor.run"),
    "holder attribute": (lambda mp: mp.setattr(torch_dr._BackendRendezvousStateHolder,
                                               "__init__", _holder_init_without_cache),
                         "_last_sync_time"),
}


@pytest.mark.usefixtures("fresh_warning")
@pytest.mark.parametrize("mismatch", list(_MISMATCHES))
def test_a_private_name_that_does_not_match_falls_back_to_stock_with_one_warning(
    etcd_server: EtcdServer, key_prefix: str, monkeypatch: pytest.MonkeyPatch, mismatch: str
) -> None:
    patch, named = _MISMATCHES[mismatch]
    patch(monkeypatch)
    params = make_params(etcd_server.get_endpoint(), new_run_id(), key_prefix, wait="watch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handlers = [dynamic_handler(params), dynamic_handler(params)]

    ours = [w for w in caught if issubclass(w.category, FastHandlerUnavailableWarning)]
    assert len(ours) == 1
    assert named in str(ours[0].message)
    assert "stock" in str(ours[0].message)
    for handler in handlers:
        # Exactly what torch's create_handler built, untouched.
        assert type(handler._op_executor) is torch_dr._DistributedRendezvousOpExecutor \
            or type(handler._op_executor) is _OtherExecutor
        assert not is_fast_handler(handler)


@pytest.mark.usefixtures("fresh_warning")
def test_an_untested_torch_falls_back_to_a_working_stock_handler(
    etcd_server: EtcdServer, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    params = make_params(etcd_server.get_endpoint(), new_run_id(), key_prefix, wait="watch")
    with pytest.warns(FastHandlerUnavailableWarning, match=r"torch 2\.99\.0 is not a tested"):
        handler = dynamic_handler(params)

    assert type(handler._op_executor) is torch_dr._DistributedRendezvousOpExecutor
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1)
    assert handler.shutdown()


def test_the_check_passes_on_this_torch() -> None:
    assert fast_handler.why_unavailable() is None
