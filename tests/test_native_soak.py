"""The native rendezvous under a randomized fault soak (etcd_rdzv.testing.soak), and the
soak's invariant checker on hand-made histories, so that it is shown to fail when it should.

The soak itself is ``slow`` (it runs in CI): about 60 s of faults with seed 1. For longer
runs set ``SOAK_SECONDS`` and ``SOAK_SEED`` (or ``SOAK_SEEDS=1,2,3``); ``make soak`` does.
"""

from __future__ import annotations

import os

import pytest

from etcd_rdzv.testing.soak import (
    EtcdLook,
    SoakChecker,
    SoakConfig,
    SoakEvent,
    liveness_bound,
    plan_bursts,
    run_soak,
)

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SOAK_SEEDS = [int(seed) for seed in
              os.environ.get("SOAK_SEEDS", os.environ.get("SOAK_SEED", "1")).split(",")
              if seed.strip()]
#: The faults, a heal after each burst (a few seconds, liveness_bound at worst, when the
#: soak stops), the first round, the close, etcd's start and stop, and room for a loaded
#: machine.
SOAK_TIMEOUT = 2 * SOAK_SECONDS + 300


@pytest.mark.slow
@pytest.mark.timeout(SOAK_TIMEOUT)
@pytest.mark.parametrize("seed", SOAK_SEEDS)
def test_native_rendezvous_soak(seed: int) -> None:
    report = run_soak(SoakConfig.for_seed(SOAK_SECONDS, seed))
    print(report.summary())
    assert report.ok, report.describe()
    assert report.settled_after is not None
    assert report.rounds_sealed > 1 and sum(report.faults.values()) > 0


# --- the checker on hand-made histories ------------------------------------------------------

def node_id(index: int) -> tuple[str, int, int]:
    """Descriptors whose order is the index's."""
    return ("10.0.0.1", 100 + index, 0)


class Story:
    """A hand-made history: nodes spawned, joining, admitted, gone."""

    def __init__(self, min_nodes: int = 2, max_nodes: int = 3) -> None:
        self.checker = SoakChecker(min_nodes, max_nodes)
        self.at = 0.0

    def event(self, kind: str, node: str = "", **fields: object) -> None:
        self.at += 0.1
        self.checker.record(SoakEvent(self.at, kind, node, **fields))  # type: ignore[arg-type]

    def start(self, *nodes: str) -> None:
        for node in nodes:
            self.event("spawn", node)
            self.event("hello", node, node_id=node_id(int(node[1:])))
            self.event("joining", node)

    def admit(self, node: str, round_: int, rank: int, world_size: int) -> None:
        self.event("admitted", node, round=round_, rank=rank, world_size=world_size,
                   node_id=node_id(int(node[1:])))

    def kinds(self) -> list[str]:
        return [violation.kind for violation in self.checker.violations]


def test_a_clean_history_has_no_violation_and_is_settled() -> None:
    story = Story()
    story.start("n0", "n1", "n2")
    for rank, node in enumerate(["n0", "n1", "n2"]):
        story.admit(node, 1, rank, 3)
    story.event("crash", "n1")
    story.start("n3")
    for node in ("n0", "n2"):
        story.event("restart", node)
    story.admit("n0", 2, 0, 3)
    story.admit("n2", 2, 1, 3)
    story.admit("n3", 2, 2, 3)
    assert story.kinds() == []
    assert story.checker.unsettled() == []
    assert story.checker.check_liveness(story.at, 30) == []


def test_a_rank_held_twice_is_a_violation() -> None:
    story = Story()
    story.start("n0", "n1")
    story.admit("n0", 1, 0, 2)
    story.admit("n1", 1, 0, 2)
    assert story.kinds() == ["rank-twice"]
    assert story.checker.violations[0].round == 1
    assert story.checker.violations[0].nodes == ("n0", "n1")


def test_ranks_out_of_torchs_order_are_a_violation() -> None:
    story = Story()
    story.start("n0", "n1")
    story.admit("n1", 1, 0, 2)  # n1 sorts after n0, so it must have the higher rank
    story.admit("n0", 1, 1, 2)
    assert story.kinds() == ["order"]
    assert "not torch's order" in story.checker.violations[0].message


def test_torchs_order_is_address_then_pid_then_local_id() -> None:
    story = Story()
    for node, ident in (("n0", ("10.0.0.10", 5, 0)), ("n1", ("10.0.0.2", 1, 0)),
                        ("n2", ("10.0.0.2", 1, 1))):
        story.event("spawn", node)
        story.event("hello", node, node_id=ident)
    # "10.0.0.10" < "10.0.0.2" as strings, whatever the pid; then the local id decides.
    for rank, node in enumerate(["n0", "n1", "n2"]):
        story.event("admitted", node, round=1, rank=rank, world_size=3)
    assert story.kinds() == []


def test_two_world_sizes_in_a_round_are_a_violation() -> None:
    story = Story()
    story.start("n0", "n1", "n2")
    story.admit("n0", 1, 0, 3)
    story.admit("n1", 1, 1, 2)
    assert story.kinds() == ["world-size"]


def test_a_world_outside_min_and_max_nodes_and_a_rank_past_it_are_violations() -> None:
    story = Story(min_nodes=2, max_nodes=3)
    story.start("n0", "n1")
    story.admit("n0", 1, 0, 1)
    story.admit("n1", 2, 3, 3)
    assert story.kinds() == ["world-size", "rank-range"]


def test_a_round_going_backwards_is_a_violation() -> None:
    story = Story()
    story.start("n0", "n1")
    story.admit("n0", 2, 0, 2)
    story.admit("n1", 2, 1, 2)
    story.event("waiting", "n0")
    story.admit("n0", 1, 0, 2)
    assert story.kinds() == ["round-order"]


def test_the_same_round_twice_for_a_node_is_a_violation() -> None:
    story = Story()
    story.start("n0", "n1")
    story.admit("n0", 1, 0, 2)
    story.admit("n0", 1, 0, 2)
    assert story.kinds() == ["round-order"]


def test_a_node_never_readmitted_is_a_liveness_violation() -> None:
    story = Story(min_nodes=2, max_nodes=3)
    story.start("n0", "n1", "n2")
    for rank, node in enumerate(["n0", "n1", "n2"]):
        story.admit(node, 1, rank, 3)
    for node in ("n0", "n1", "n2"):
        story.event("waiting", node)
    story.admit("n0", 2, 0, 2)  # round 2 has room for n2, which waits on
    story.admit("n1", 2, 1, 2)
    assert story.checker.unsettled() == ["n2 waits while round 2 has room (2 < max_nodes=3)"]
    [violation] = story.checker.check_liveness(story.at, 30)
    assert violation.kind == "liveness" and "n2" in violation.nodes
    assert violation.round == 2


def test_a_waiting_node_without_a_join_key_in_etcd_is_not_settled() -> None:
    story = Story(min_nodes=1, max_nodes=2)
    story.start("n0", "n1", "n2", "n3")
    story.admit("n0", 4, 0, 2)
    story.admit("n1", 4, 1, 2)
    assert story.checker.standbys() == ["n2", "n3"]
    keys = {"n0": (4,), "n1": (4,), "n2": (5,), "n3": (4,)}  # n3 was left out of round 4
    assert story.checker.unsettled() == []
    assert story.checker.unsettled(EtcdLook(keys)) == [
        "n3 waits with no join key in etcd past round 4 (it holds keys of rounds 4): no member "
        "can count it"]
    [violation] = story.checker.check_liveness(story.at, 30, look=EtcdLook({**keys, "n3": ()}))
    assert "n3 waits with no join key in etcd past round 4 (it holds none)" in violation.message


def test_a_waiting_node_beside_a_full_round_with_a_member_gone_is_not_settled() -> None:
    story = Story(min_nodes=1, max_nodes=2)
    story.start("n0", "n1", "n2")
    story.admit("n0", 4, 0, 2)
    story.admit("n1", 4, 1, 2)
    # n1's lease lapsed while it trained: round 4 has room, which n2 must be admitted to.
    look = EtcdLook({"n0": (4,), "n2": (5,)})
    assert story.checker.unsettled(look) == ["n2 waits while round 4 has room: n1 holds no "
                                             "join key in it"]
    assert story.checker.unsettled(EtcdLook({"n0": (4,), "n1": (4,), "n2": (5,)})) == []


def test_a_waiting_marker_without_a_lease_is_not_settled() -> None:
    story = Story(min_nodes=1, max_nodes=2)
    story.start("n0", "n1", "n2")
    story.admit("n0", 4, 0, 2)
    story.admit("n1", 4, 1, 2)
    look = EtcdLook({"n0": (4,), "n1": (4,), "n2": (5,)}, ("ctl/wait/0000000005",))
    assert story.checker.unsettled(look) == [
        "ctl/wait/0000000005 has no lease in etcd: nothing ever deletes it"]


def test_a_member_left_in_an_old_round_or_a_missing_rank_is_not_settled() -> None:
    story = Story(min_nodes=2, max_nodes=3)
    story.start("n0", "n1", "n2")
    for rank, node in enumerate(["n0", "n1", "n2"]):
        story.admit(node, 1, rank, 3)
    story.event("waiting", "n0")
    story.event("waiting", "n1")
    story.admit("n0", 2, 0, 3)
    story.admit("n1", 2, 1, 3)  # rank 2 of round 2 is n2's, which still trains in round 1
    assert story.checker.unsettled() == [
        "n2 still trains in round 1 while round 2 is the latest",
        "round 2's live members hold ranks [0, 1] of a world of 3",
    ]


def test_a_standby_beside_a_full_round_is_settled() -> None:
    story = Story(min_nodes=2, max_nodes=2)
    story.start("n0", "n1", "n2")
    story.admit("n0", 1, 0, 2)
    story.admit("n1", 1, 1, 2)
    assert story.checker.unsettled() == []
    assert story.checker.standbys() == ["n2"]


def test_an_error_before_the_close_is_a_violation() -> None:
    story = Story()
    story.start("n0", "n1")
    story.event("exit", "n1", error="JoinTimeoutError", detail="not admitted")
    story.event("exit", "n0", error="RunClosedError", detail="closed, though nobody closed it")
    assert story.kinds() == ["exception", "exception"]


def test_the_close_expects_standby_exit_for_standbys_and_run_closed_for_the_others() -> None:
    story = Story(min_nodes=2, max_nodes=2)
    story.start("n0", "n1", "n2", "n3")
    story.admit("n0", 1, 0, 2)
    story.admit("n1", 1, 1, 2)
    story.checker.begin_close(story.at, "n0")
    story.event("shutdown", "n0", detail="ok")
    story.event("exit", "n1", error="RunClosedError")
    story.event("exit", "n2", error="StandbyExitError")
    story.event("exit", "n3", error="RunClosedError")  # a standby: the wrong error
    assert story.kinds() == ["close"]
    assert story.checker.violations[0].nodes == ("n3",)
    assert story.checker.check_closed(story.at) == []


def test_a_node_that_does_not_exit_after_the_close_is_a_violation() -> None:
    story = Story(min_nodes=2, max_nodes=2)
    story.start("n0", "n1", "n2")
    story.admit("n0", 1, 0, 2)
    story.admit("n1", 1, 1, 2)
    story.checker.begin_close(story.at, "n0")
    story.event("shutdown", "n0", detail="ok")
    story.event("exit", "n1", error="RunClosedError")
    [violation] = story.checker.check_closed(story.at)
    assert violation.kind == "close" and violation.nodes == ("n2",)


def test_a_seed_plans_the_same_faults_and_etcd_only_bursts_have_no_node_fault() -> None:
    config = SoakConfig.for_seed(120, 3)
    bursts = plan_bursts(config)
    assert bursts == plan_bursts(SoakConfig.for_seed(120, 3))
    assert bursts != plan_bursts(SoakConfig.for_seed(120, 4))
    assert sum(burst.seconds for burst in bursts) == pytest.approx(120)
    assert {fault.kind for burst in bursts for fault in burst.faults} == {
        "crash", "leave", "standby", "leader", "pause"}
    for burst in bursts:
        assert sum(fault.after for fault in burst.faults) <= burst.seconds
        if burst.etcd_only:
            assert {fault.kind for fault in burst.faults} <= {"leader", "pause"}


def test_the_liveness_bound_covers_a_lease_and_a_round_but_not_join_timeout() -> None:
    config = SoakConfig.for_seed(60, 1)
    assert config.node_ttl == 2
    assert config.min_nodes in (3, 4) and config.keep_alive_max_attempt in (3, 4)
    bound = liveness_bound(config)
    assert 2 * (config.node_ttl + config.last_call_timeout) < bound < config.join_timeout
    assert SoakConfig.for_seed(60, 1) == config  # the draws are the seed's
