"""The native rendezvous in the seeded simulation (:mod:`etcd_rdzv.testing.simulation`): the
real rules against a model of etcd on a virtual clock, hundreds of seeds in seconds.

* The etcd model's semantics that the protocol leans on, each shown once.
* Many seeds keep every invariant.
* The bugs the simulation found, each by the shortest schedule that showed it
  (:data:`FIXED_BUGS`): those schedules must now keep every invariant.
* The simulation catches broken rules: parts of an earlier fix (72d92d2) reverted.

``SIM_SEEDS`` (default 200) seeds of ``SIM_SECONDS`` (default 60) virtual seconds of faults
each; ``make soak`` runs a longer form.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import pytest

from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native.decide import Counts, Join, NodeView, Rule, Step, decide
from etcd_rdzv.testing.simulation import SimConfig, SimReport, simulate
from etcd_rdzv.testing.simulation import requests as sim_requests
from etcd_rdzv.testing.simulation.clock import Clock
from etcd_rdzv.testing.simulation.etcd import (
    EXPIRY_SWEEP,
    EtcdModel,
    LeaseGoneError,
    RefusedError,
    prefix_end,
)

SIM_SEEDS = int(os.environ.get("SIM_SEEDS", "200"))
SIM_SECONDS = float(os.environ.get("SIM_SECONDS", "60"))

# --- the etcd model ---------------------------------------------------------------------------

KEYS = RunKeys("sim-test")
ROUND = KEYS.round_prefix(1)


def model() -> tuple[Clock, EtcdModel]:
    import random

    clock = Clock()
    return clock, EtcdModel(clock, KEYS.control_prefix, random.Random(0))


def test_a_count_at_a_past_revision_sees_the_keys_then_created_by_then() -> None:
    _, etcd = model()
    a, b, c = ROUND + b"a", ROUND + b"b", ROUND + b"c"
    first = etcd.write(puts=[(a, b"1", 0)])
    etcd.write(puts=[(b, b"1", 0)])
    cutoff = etcd.write(puts=[(a, b"2", 0)])  # a put on a live key keeps its create revision
    etcd.write(deletes=[b], puts=[(c, b"1", 0)])
    end = prefix_end(ROUND)
    assert etcd.count(ROUND, end) == 2  # a, c
    assert etcd.count(ROUND, end, cutoff, cutoff) == 2  # a, b: b was deleted later
    assert etcd.count(ROUND, end, cutoff, first) == 1  # a only was created by `first`
    assert etcd.count(ROUND, c, cutoff, cutoff) == 2  # the keys before c, as a rank read


def test_a_lease_expires_a_ttl_after_its_keep_alive_stops_with_its_keys_in_one_revision() -> None:
    clock, etcd = model()
    lease = etcd.grant(2)
    assert etcd.renewing(lease)
    etcd.write(puts=[(ROUND + b"a", b"", lease), (KEYS.waiting(1), b"", lease)])
    changes: list[tuple[float, int, bytes, bytes | None]] = []
    etcd.watch("test", lambda revision, key, value: changes.append(
        (clock.now, revision, key, value)))
    clock.after(10.0, clock.stop)
    etcd.stop_renewing(lease, 1.0)  # renewed last at 1.0: it expires at 3.0
    clock.run()
    assert not etcd.has(lease) and etcd.count(ROUND, prefix_end(ROUND)) == 0
    [(at, revision, key, value)] = changes  # one revision; of the two keys only ctl/ is watched
    assert (revision, key, value) == (3, KEYS.waiting(1), None)
    assert 3.0 <= at <= 3.0 + EXPIRY_SWEEP
    assert not etcd.renewing(lease)


def test_writes_etcd_refuses_write_nothing() -> None:
    _, etcd = model()
    lease = etcd.grant(2)
    assert etcd.create(KEYS.waiting(1), b"a", lease) is None
    assert etcd.create(KEYS.waiting(1), b"b", 0x999) == b"a"  # the lease is not checked
    before = etcd.revision
    with pytest.raises(LeaseGoneError):
        etcd.write(puts=[(ROUND + b"a", b"", 0x999)])
    with pytest.raises(RefusedError, match="duplicate key"):
        etcd.write(deletes=[ROUND + b"a"], puts=[(ROUND + b"a", b"", lease)])
    assert etcd.revision == before


# --- many seeds ---------------------------------------------------------------------------------

#: A bug's schedule: seed, faults, min_nodes, max_nodes, nodes; 10 virtual seconds of faults
#: in one burst.
Schedule = tuple[int, tuple[str, ...], int, int, int]

#: The bugs the simulation found, all fixed (306cf67, and sealed-short in the commit after
#: 3a28f5f): name -> what happened, and the shortest schedule that showed it, which must now
#: keep every invariant.
FIXED_BUGS: dict[str, tuple[str, Schedule]] = {
    "sealed-short": ("a node whose lease expired after the count that made its round due "
                     "sealed it anyway: the seal step's recount missed its own key, which "
                     "dropped its key but kept its last call, so the round was sealed with the "
                     "keys left, fewer than min_nodes, by a node not in it",
                     (14, ("stall",), 2, 2, 2)),
    "readmitted": ("a node that sealed its round itself and restarted before its watch showed "
                   "the seal joined that round again (its fresh view forgot the learned "
                   "seal) and was admitted to it a second time", (645, ("leave",), 2, 2, 2)),
    "left-behind": ("a join whose answer was lost left its key in that round when the node "
                    "joined a later one (the executor only deleted the last key it knew); "
                    "sealed with it, the round had a rank nobody took, and the next round "
                    "waited forever for it to drain", (87, ("lost", "leave"), 2, 2, 2)),
    "superseded": ("a round whose members all lost their leases while training was replaced "
                   "by a new round, and nothing told them: two rounds trained at once",
                   (201, ("stall",), 1, 1, 2)),
    "standby-close": ("a standby whose count saw the closer's key gone before its watch "
                      "showed the close exited with RunClosedError, not StandbyExitError",
                      (340, ("arrive",), 1, 1, 1)),
    "sealed-after-close": ("a standby whose watch showed the close late sealed a round after "
                           "it and trained in a closed run", (107, ("arrive",), 1, 1, 1)),
}


def schedule(seed: int, faults: tuple[str, ...], min_nodes: int, max_nodes: int,
             nodes: int) -> SimConfig:
    """A bug's schedule: ``faults`` alone, in one burst of 10 virtual seconds."""
    return SimConfig.for_seed(10, seed, faults=tuple((kind, 1.0) for kind in faults),
                              burst_seconds=(10.0, 10.0), min_nodes=min_nodes,
                              max_nodes=max_nodes, nodes=nodes)


@pytest.mark.timeout(max(120.0, SIM_SEEDS * (SIM_SECONDS + 60) / 300))  # 10x this machine's
def test_many_seeds_keep_the_invariants() -> None:
    started = time.perf_counter()
    failed: list[SimReport] = []
    rounds = events = 0
    for seed in range(SIM_SEEDS):
        report = simulate(SimConfig.for_seed(SIM_SECONDS, seed))
        rounds, events = rounds + report.rounds_sealed, events + report.events
        if not report.ok:
            failed.append(report)
    took = time.perf_counter() - started
    print(f"{SIM_SEEDS} seeds x {SIM_SECONDS:g} virtual s in {took:.1f} s "
          f"({SIM_SEEDS / took:.1f} seeds/s, {events / took:.0f} events/s), {rounds} rounds; "
          f"{len(failed)} seeds with violations")
    assert not failed, "\n\n".join(report.describe() for report in failed[:3])
    assert rounds > SIM_SEEDS  # the seeds did form rounds, under faults


@pytest.mark.parametrize("bug", sorted(FIXED_BUGS))
def test_the_schedule_that_once_showed_a_fixed_bug_keeps_every_invariant(bug: str) -> None:
    report = simulate(schedule(*FIXED_BUGS[bug][1]))
    assert report.ok, report.describe()
    assert report.rounds_sealed and sum(report.faults.values())


def test_a_seed_replays_the_same_run() -> None:
    first, again = (simulate(SimConfig.for_seed(30, 7)) for _ in range(2))
    assert (first.events, first.admissions, first.violations, first.faults) == \
        (again.events, again.admissions, again.violations, again.faults)
    assert first.events > 500 and sum(first.faults.values()) > 5


# --- the simulation catches broken rules ------------------------------------------------------

def test_a_join_that_deletes_the_key_it_puts_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """72d92d2's fix, the requests' half: a node whose lease expired re-joins its own round,
    and its join Txn must not delete the key it puts (etcd refuses a Txn that deletes and
    puts one key: the node fails). The mutant deletes every key the node may hold."""
    def join(etcd: EtcdModel, keys: RunKeys, round_: int, name: bytes, lease: int,
             held: Iterable[bytes], read_at: float) -> Counts:
        etcd.write(deletes=sorted(held), puts=[(keys.member(round_, name), b"{}", lease)])
        return sim_requests.count(etcd, keys, round_, name, lease, read_at)[0]

    monkeypatch.setattr(sim_requests, "join", join)
    caught = [seed for seed in range(10)
              if any("duplicate key" in v.message
                     for v in simulate(SimConfig.for_seed(SIM_SECONDS, seed)).violations)]
    assert caught, "no seed caught a join that deletes its own key"


def join_only_without_a_lease(view: NodeView) -> Step:
    """72d92d2's fix, the rules' half, reverted: JOIN only when the node has no lease, not
    whenever it has no key under its current one."""
    step = decide(view)
    if isinstance(step, Join) and step.rule is Rule.JOIN and view.lease:
        return decide(replace(view, key_lease=view.lease))
    return step


@pytest.mark.parametrize("seed", [0, 1])
def test_a_join_rule_blind_to_a_lost_key_is_caught(seed: int) -> None:
    """A node whose join was refused before it reached etcd takes the key as put; its next
    count misses it and drops it, and the JOIN rule joins again. Under the mutant it never
    does: it waits in the new round holding only its key in the previous one, which so
    seems to train forever, and nobody is admitted again (the heal says so)."""
    def run(rules: Callable[[NodeView], Step]) -> SimReport:
        return simulate(SimConfig.for_seed(60, seed, faults=(("stall", 1.0), ("refused", 1.0))),
                        rules)

    assert run(decide).ok
    assert any(v.kind == "liveness" for v in run(join_only_without_a_lease).violations)
