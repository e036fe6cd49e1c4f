"""The native rendezvous in the seeded simulation (:mod:`etcd_rdzv.testing.simulation`): the
real rules against a model of etcd on a virtual clock, hundreds of seeds in seconds.

* The etcd model's semantics that the protocol leans on, each shown once.
* Many seeds keep every invariant, but for the bugs the simulation found in the current
  code (:data:`KNOWN_BUGS`). Each is pinned by its shortest schedule as a strict expected
  failure: once a bug is fixed its test passes, which fails the run (XPASS), and the bug
  leaves :data:`KNOWN_BUGS`.
* The simulation catches broken rules: parts of an earlier fix (72d92d2) reverted.

``SIM_SEEDS`` (default 200) seeds of ``SIM_SECONDS`` (default 60) virtual seconds of faults
each; ``make soak`` runs a longer form.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import pytest

from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native.decide import Join, NodeView, Rule, Step, decide
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

#: The bugs the simulation found in the current code: name -> what happens, and how its
#: schedule is configured (seed, faults, min_nodes, max_nodes, nodes; 10 virtual seconds).
KNOWN_BUGS: dict[str, tuple[str, tuple[int, tuple[str, ...], int, int, int]]] = {
    "readmitted": ("a node that sealed its round itself and restarts before its watch shows "
                   "the seal joins that round again (its fresh view forgets the learned "
                   "seal) and is admitted to it a second time", (645, ("leave",), 2, 2, 2)),
    "left-behind": ("a join whose answer was lost leaves its key in that round when the node "
                    "joins a later one (the executor only deletes the last key it knows); "
                    "sealed with it, the round has a rank nobody takes, and the next round "
                    "waits forever for it to drain", (87, ("lost", "leave"), 2, 2, 2)),
    "superseded": ("a round whose members all lost their leases while training is replaced "
                   "by a new round, and nothing tells them: two rounds train at once",
                   (201, ("stall",), 1, 1, 2)),
    "standby-close": ("a standby whose count sees the closer's key gone before its watch "
                      "shows the close exits with RunClosedError, not StandbyExitError",
                      (340, ("arrive",), 1, 1, 1)),
    "sealed-after-close": ("a standby whose watch shows the close late seals a round after it "
                           "and trains in a closed run", (107, ("arrive",), 1, 1, 1)),
}


def known_bug(violation: Violation, earlier: list[Violation]) -> str | None:
    """Which of :data:`KNOWN_BUGS` ``violation`` shows (``earlier``: its report's before)."""
    kind, message = violation.kind, violation.message
    if kind == "round-order" and message.endswith(f"after round {violation.round}"):
        return "readmitted"
    if kind == "keys" or (kind in ("liveness", "exception", "close")
                          and any(v.kind == "keys" for v in earlier)):
        return "left-behind"
    if kind == "liveness" and "still trains in round" in message:
        return "superseded"
    if kind == "close" and "(a standby) got RunClosedError" in message:
        return "standby-close"
    if kind == "closed" or (kind == "close" and "(training) did not exit" in message
                            and any(v.kind == "closed" for v in earlier)):
        return "sealed-after-close"
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
    what, (seed, faults, min_nodes, max_nodes, nodes) = KNOWN_BUGS[bug]
    request.applymarker(pytest.mark.xfail(strict=True, raises=KnownBugError, reason=what))
    report = simulate(SimConfig.for_seed(
        10, seed, faults=tuple((kind, 1.0) for kind in faults), burst_seconds=(10.0, 10.0),
        min_nodes=min_nodes, max_nodes=max_nodes, nodes=nodes))
    found = {known_bug(v, list(report.violations[:i])) for i, v in enumerate(report.violations)}
    assert None not in found, report.describe()
    if bug in found:
        raise KnownBugError(report.describe())


def test_a_seed_replays_the_same_run() -> None:
    first, again = (simulate(SimConfig.for_seed(30, 7)) for _ in range(2))
    assert (first.events, first.admissions, first.violations, first.faults) == \
        (again.events, again.admissions, again.violations, again.faults)
    assert first.events > 500 and sum(first.faults.values()) > 5


# --- the simulation catches broken rules ------------------------------------------------------

def test_a_join_that_deletes_the_key_it_puts_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """72d92d2's fix, the requests' half: a node whose lease expired re-joins its own round,
    and its join Txn must not delete the key it puts (etcd refuses a Txn that deletes and
    puts one key: the node fails)."""
    def join(etcd: EtcdModel, keys: RunKeys, round_: int, name: bytes, lease: int,
             old_key: bytes | None) -> tuple[int, int]:
        etcd.write(deletes=[] if old_key is None else [old_key],
                   puts=[(keys.member(round_, name), b"{}", lease)])
        joined, previous, _ = sim_requests.count(etcd, keys, round_)
        return joined, previous

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


@pytest.mark.parametrize("seed", [17, 285])
def test_a_join_rule_blind_to_a_lost_key_is_caught(seed: int) -> None:
    """A standby whose lease expired, whose new lease was granted but whose join was refused,
    waits with no key under the mutant: nobody can count it, and the heal says so."""
    def run(rules: Callable[[NodeView], Step]) -> SimReport:
        return simulate(SimConfig.for_seed(60, seed, faults=(("stall", 1.0), ("refused", 1.0))),
                        rules)

    def unseen(report: SimReport) -> list[Violation]:
        return [v for v in report.violations if "waits with no join key" in v.message]

    assert not unseen(run(decide))
    assert unseen(run(join_only_without_a_lease))
