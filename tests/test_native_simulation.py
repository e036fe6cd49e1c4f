"""The native rendezvous in the seeded simulation (:mod:`etcd_rdzv.testing.simulation`): the
real rules against a model of etcd on a virtual clock, hundreds of seeds in seconds.

* The etcd model's semantics that the protocol leans on, each shown once.
* Many seeds keep every invariant, but for the bugs the simulation found in the current
  code (:data:`KNOWN_BUGS`). Each is pinned by its shortest schedule as a strict expected
  failure: once a bug is fixed its test passes, which fails the run (XPASS), and the bug
  leaves :data:`KNOWN_BUGS` for :data:`FIXED_BUGS`, whose schedules must keep every
  invariant.
* The simulation catches broken rules: parts of an earlier fix (72d92d2) reverted.

``SIM_SEEDS`` (default 200) seeds of ``SIM_SECONDS`` (default 60) virtual seconds of faults
each; ``make soak`` runs a longer form.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
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
from etcd_rdzv.testing.soak import Violation

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

#: The bugs the simulation found in the current code: name -> what happens, and its shortest
#: schedule.
KNOWN_BUGS: dict[str, tuple[str, Schedule]] = {
    "sealed-short": ("a node whose lease expires after the count that made its round due "
                     "seals it anyway: the seal step's recount misses its own key (mine is "
                     "False), which drops its key but keeps its quorum_at, so seal_due has "
                     "passed and the round is sealed with the keys left, fewer than "
                     "min_nodes, by a node not in it", (14, ("stall",), 2, 2, 2)),
}

#: The bugs the simulation found and 306cf67 fixed: name -> what happened, and the shortest
#: schedule that showed it, which must now keep every invariant.
FIXED_BUGS: dict[str, tuple[str, Schedule]] = {
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


def known_bug(violation: Violation, earlier: list[Violation]) -> str | None:
    """Which of :data:`KNOWN_BUGS` ``violation`` shows (``earlier``: its report's before)."""
    short = re.search(r"got a world of (\d+), outside min_nodes=(\d+)", violation.message)
    if violation.kind == "world-size" and short and int(short[1]) < int(short[2]):
        return "sealed-short"
    return None


@pytest.mark.timeout(max(120.0, SIM_SEEDS * (SIM_SECONDS + 60) / 300))  # 10x this machine's
def test_many_seeds_keep_the_invariants_but_for_the_known_bugs() -> None:
    started = time.perf_counter()
    known: Counter[str] = Counter()
    unknown: list[SimReport] = []
    rounds = events = 0
    for seed in range(SIM_SEEDS):
        report = simulate(SimConfig.for_seed(SIM_SECONDS, seed))
        rounds, events = rounds + report.rounds_sealed, events + report.events
        bugs = [known_bug(v, list(report.violations[:i]))
                for i, v in enumerate(report.violations)]
        known.update(bug for bug in bugs if bug is not None)
        if None in bugs:
            unknown.append(report)
    took = time.perf_counter() - started
    print(f"{SIM_SEEDS} seeds x {SIM_SECONDS:g} virtual s in {took:.1f} s "
          f"({SIM_SEEDS / took:.1f} seeds/s, {events / took:.0f} events/s), {rounds} rounds; "
          f"known bugs seen: {dict(known) or 'none'}")
    assert not unknown, "\n\n".join(report.describe() for report in unknown[:3])
    assert rounds > SIM_SEEDS  # the seeds did form rounds, under faults


class KnownBugError(Exception):
    """A schedule showed its known bug, and nothing else: the expected failure."""


@pytest.mark.parametrize("bug", sorted(KNOWN_BUGS))
def test_the_shortest_schedule_of_a_known_bug(bug: str, request: pytest.FixtureRequest) -> None:
    """Strictly expected to fail with its bug (a violation no known bug explains fails the
    test; once the bug no longer shows, the pass fails it as XPASS: take it out of
    KNOWN_BUGS)."""
    what, shape = KNOWN_BUGS[bug]
    request.applymarker(pytest.mark.xfail(strict=True, raises=KnownBugError, reason=what))
    report = simulate(schedule(*shape))
    found = {known_bug(v, list(report.violations[:i])) for i, v in enumerate(report.violations)}
    assert None not in found, report.describe()
    if bug in found:
        raise KnownBugError(report.describe())


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
