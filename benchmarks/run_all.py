"""Every benchmark in one run, written up as docs/benchmarks.md with plots (``make bench``).

    python -m benchmarks [--quick] [--only calls rendezvous contention scale store]
                         [--output PATH] [--images DIR] [--render-only]

Full mode writes ``docs/benchmarks.md`` and ``docs/img/benchmarks/*.png``; ``--quick`` (``make
bench-quick``: a few minutes) writes ``benchmarks/results/benchmarks-quick.md`` and its plots
beside it, so that a quick run never replaces the published figures. The raw results are
kept (``benchmarks/results/<name>.pickle``, git-ignored): ``--render-only`` writes the
document again from them without measuring.

Each topic starts and stops its own servers (etcd on loopback, a TCPStore) and processes.
"""

from __future__ import annotations

import argparse
import pickle
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _plots, backend_calls, contention, rendezvous, state_scale, store_wakeup
from ._backends import C10D, ETCD_V2
from ._common import RESULTS_DIR, exit_on_sigterm, machine_description, now_utc, write_text

__all__ = ["TOPICS", "main"]

ROOT = Path(__file__).resolve().parent.parent
FULL_OUTPUT = ROOT / "docs" / "benchmarks.md"
FULL_IMAGES = ROOT / "docs" / "img" / "benchmarks"
QUICK_OUTPUT = RESULTS_DIR / "benchmarks-quick.md"
QUICK_IMAGES = RESULTS_DIR / "benchmarks-quick"
TOPICS = ("calls", "rendezvous", "contention", "scale", "store")

#: The targets, as stated in the issue.
SHIM_FLOOR_TARGET = 1.2
CONFLICT_SPEEDUP_TARGET = 2.0
LEVER_TARGET = 0.5
LEVER_N = 32
CAPACITY_TARGET = 100_000


@dataclass
class Run:
    """What one run measured, topic by topic, and how."""

    quick: bool
    command: str
    started: str = field(default_factory=now_utc)
    seconds: dict[str, float] = field(default_factory=dict)
    calls: backend_calls.CallResults | None = None
    rendezvous: rendezvous.RendezvousResults | None = None
    contention: contention.ContentionResults | None = None
    scale: state_scale.ScaleResults | None = None
    store: store_wakeup.StoreResults | None = None
    machine: list[str] = field(default_factory=list)


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _measure_topic(run: Run, topic: str) -> None:
    quick = run.quick
    if topic == "calls":
        calls, rounds, warmup = backend_calls.settings(quick)
        run.calls = backend_calls.collect(calls=calls, rounds=rounds, warmup=warmup)
    elif topic == "rendezvous":
        sizes, lever_sizes, trials = rendezvous.settings(quick)
        run.rendezvous = rendezvous.collect(sizes=sizes, lever_sizes=lever_sizes,
                                            backoffs=rendezvous.BACKOFFS, trials=trials,
                                            progress=_say)
    elif topic == "contention":
        tasks, processes, backoffs, seconds, rounds = contention.settings(quick)
        run.contention = contention.collect(tasks=tasks, processes=processes,
                                            backoffs=backoffs, seconds=seconds,
                                            rounds=rounds, progress=_say)
    elif topic == "scale":
        scale_sizes, repeats, tolerance = state_scale.QUICK if quick else state_scale.FULL
        run.scale = state_scale.collect(sizes=scale_sizes, repeats=repeats,
                                        tolerance=tolerance, progress=_say)
    elif topic == "store":
        store_rounds, batches, adders, adds = \
            store_wakeup.QUICK if quick else store_wakeup.FULL
        run.store = store_wakeup.collect(rounds=store_rounds, batches=batches, adders=adders,
                                         adds=adds, progress=_say)
    else:
        raise ValueError(f"unknown topic {topic!r}")


def measure(run: Run, topics: Sequence[str]) -> None:
    for topic in topics:
        _say(f"{topic}: starting")
        started = time.monotonic()
        _measure_topic(run, topic)
        run.seconds[topic] = time.monotonic() - started
        _say(f"{topic}: done in {run.seconds[topic]:.0f} s")
    run.machine = machine_description()


# --- targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured
    gap: str = ""
    """By how much it is missed, when it is."""


def _over(value: float, limit: float) -> str:
    """How far ``value`` is above the ceiling ``limit``, in percent of it."""
    return f"{(value / limit - 1) * 100:.0f}% over the {limit:g}x ceiling"


def _under(value: float, floor: float) -> str:
    return f"{(1 - value / floor) * 100:.0f}% short of the {floor:g}x floor"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}x"


def verdicts(run: Run) -> list[Verdict]:
    out: list[Verdict] = []
    if run.calls is not None:
        ratios = backend_calls.targets(run.calls)
        get, put = ratios["shim get / raw get"], ratios["shim set / raw txn"]
        stale = ratios["shim stale / raw stale"]
        known = [r for r in (get, put) if r is not None]
        worst = max(known) if known else None
        out.append(Verdict(
            f"sync shim within {SHIM_FLOOR_TARGET}x of the raw aetcd floor per call",
            f"get_state {_fmt(get)}, set_state {_fmt(put)} (conflicting set_state "
            f"{_fmt(stale)})",
            None if worst is None else worst <= SHIM_FLOOR_TARGET,
            "" if worst is None else _over(worst, SHIM_FLOOR_TARGET)))
        speedup = ratios["v2 stale / shim stale"]
        out.append(Verdict(
            f"set_state on conflict at least {CONFLICT_SPEEDUP_TARGET:g}x faster than etcd-v2",
            f"etcd-v2 / etcd-v3 shim: {_fmt(speedup)}",
            None if speedup is None else speedup >= CONFLICT_SPEEDUP_TARGET,
            "" if speedup is None else _under(speedup, CONFLICT_SPEEDUP_TARGET)))
    results = run.rendezvous
    if results is not None:
        for family in ("etcd-v3 poll", "etcd-v3 watch"):
            if results.variant(family) is None:
                continue
            pairs = [(n, results.paired(family, C10D, n)) for n in results.sizes]
            measured = [(n, r) for n, r in pairs if r is not None]
            if not measured:
                continue
            worse = [(n, r) for n, r in measured if r.median > 1.0]
            out.append(Verdict(
                f"time to rendezvous no worse than c10d at every N ({family})",
                ", ".join(f"N={n}: {r.median:.2f}x" for n, r in measured),
                not worse,
                "; ".join(f"N={n}: {(r.median - 1) * 100:.0f}% slower than c10d (per-trial "
                          f"range {r.low:.2f} to {r.high:.2f}"
                          + (", some trials faster)" if r.low <= 1.0 else ")")
                          for n, r in worse)))
        best: tuple[str, float] | None = None
        for label in results.labels():
            variant = results.variant(label)
            if variant is None or not variant.backoff:
                continue
            ratio = results.paired(label, C10D, LEVER_N)
            if ratio is not None and (best is None or ratio.median < best[1]):
                best = (label, ratio.median)
        out.append(Verdict(
            f"time to rendezvous at N = {LEVER_N} with the collision lever on at most "
            f"{LEVER_TARGET:g}x c10d's",
            "n/a" if best is None else f"{best[1]:.2f}x ({best[0]}, the best lever variant)",
            None if best is None else best[1] <= LEVER_TARGET,
            "" if best is None else _over(best[1], LEVER_TARGET)))
    if run.scale is not None:
        capacity = run.scale.capacity(state_scale.V3_FORM)
        out.append(Verdict(
            f"state capacity of at least {CAPACITY_TARGET:,} nodes under the default request "
            "limit",
            "n/a" if capacity is None else f"{capacity.nodes:,} nodes "
            f"({capacity.nodes / CAPACITY_TARGET:.2f}x the target)",
            None if capacity is None else capacity.nodes >= CAPACITY_TARGET,
            "" if capacity is None else
            f"{(1 - capacity.nodes / CAPACITY_TARGET) * 100:.0f}% short"))
    return out


def verdict_table(items: Sequence[Verdict]) -> str:
    lines = ["| target | measured (ratios from this run) | result |", "|---|---|---|"]
    for item in items:
        result = "not measured" if item.met is None else \
            ("met" if item.met else f"**missed**: {item.gap}")
        lines.append(f"| {item.target} | {item.measured} | {result} |")
    return "\n".join(lines)


# --- the document -------------------------------------------------------------------------


def _image(path: Path, output: Path, alt: str) -> str:
    try:
        relative = path.relative_to(output.parent)
    except ValueError:
        relative = path
    return f"![{alt}]({relative.as_posix()})"


def _plots_for(draw: Callable[[Any, Path], list[Path]], results: Any, images: Path,
               output: Path, alt: str) -> list[str]:
    reason = _plots.unavailable()
    if reason is not None:
        return [f"(No plot: {reason}.)"]
    return [_image(path, output, alt) for path in draw(results, images)]


def _median(values: Any) -> float:
    return float(statistics.median(values))


def _where_the_time_goes(results: rendezvous.RendezvousResults) -> list[str]:
    """Bullets computed from the breakdown: the poll, the jitter, the conflicts, the rest."""
    lines = []
    for label in (v.label for v in rendezvous.main_variants(True, True)):
        if results.variant(label) is None:
            continue
        parts = []
        for n in results.sizes:
            trials = results.of(label, n)
            if not trials:
                continue
            slowest = [t.slowest for t in trials]
            split = [("1 s polls", _median(a.poll_sleep for a in slowest)),
                     ("jitter", _median(a.jitter for a in slowest)),
                     ("backend calls", _median(a.counts.call_seconds for a in slowest)),
                     ("watch waits", _median(a.counts.wait_seconds for a in slowest)),
                     ("store", _median(a.store for a in slowest)),
                     ("other", _median(a.other for a in slowest))]
            shown = " + ".join(f"{name} {value:.2f}" for name, value in split if value >= 0.005)
            parts.append(f"N={n}: {_median(a.seconds for a in slowest):.2f} s ≈ {shown} "
                         f"(conflicts: {_median(t.total('conflicts') for t in trials):.0f})")
        if parts:
            lines.append(f"- {label}: " + "; ".join(parts))
    return lines


def _collision_summary(results: rendezvous.RendezvousResults) -> list[str]:
    """The largest N: conflicts and per-call time of the slowest agent, per variant."""
    n = max(results.sizes)
    cells = []
    for label in results.labels():
        trials = results.of(label, n)
        if not trials:
            continue
        slowest = [t.slowest for t in trials]
        per_call = _median(a.counts.call_seconds / max(1, a.counts.calls) for a in slowest)
        cells.append(f"{label} {_median(t.total('conflicts') for t in trials):.0f} conflicts, "
                     f"{_median(t.seconds for t in trials):.2f} s, {per_call * 1000:.1f} ms "
                     "per backend call of the slowest agent")
    if not cells:
        return []
    return [f"At N = {n} (medians): " + "; ".join(cells) + "."]


def render(run: Run, output: Path, images: Path) -> str:
    mode = "quick" if run.quick else "full"
    make = "make bench-quick" if run.quick else "make bench"
    total = sum(run.seconds.values())
    doc = [
        "# Benchmarks: etcd-v3 against torch's c10d and etcd-v2",
        "",
        f"Generated by `{make}` (`{run.command}`), {mode} mode, started {run.started}; the "
        f"measurements took {total / 60:.1f} min ("
        + ", ".join(f"{topic} {seconds:.0f} s" for topic, seconds in run.seconds.items())
        + "). Do not edit by hand: run it again. Every figure below comes from that one run "
        "on one machine; the machine is shared and noisy, so absolute times drift between "
        "runs and the ratios, taken between variants measured side by side (interleaved), "
        "are the figures to compare.",
        "",
        "## Machine",
        "",
        *run.machine,
        "",
        "## Targets",
        "",
        verdict_table(verdicts(run)),
        "",
        *_lever_summary(run),
        *(_missed_notes(run)),
        "",
    ]
    if run.calls is not None:
        doc += [
            "## 1. Backend calls",
            "",
            "`python -m benchmarks.backend_calls` — one etcd (v2 API enabled) for every etcd "
            "variant, each on its own key; a TCPStore in the benchmark's process for c10d.",
            "",
            *_plots_for(backend_calls.plot, run.calls, images, output, "backend call latency"),
            "",
            backend_calls.markdown(run.calls),
            "",
        ]
    if run.rendezvous is not None:
        doc += [
            "## 2. Time to rendezvous",
            "",
            "`python -m benchmarks.rendezvous` — " + RENDEZVOUS_INTRO,
            "",
            *_plots_for(rendezvous.plot, run.rendezvous, images, output, "time to rendezvous"),
            "",
            rendezvous.markdown(run.rendezvous),
            "",
            "### Where the time goes",
            "",
            "The slowest agent's time, split (medians over the trials):",
            "",
            *_where_the_time_goes(run.rendezvous),
            "",
            *_collision_summary(run.rendezvous),
            "",
            *WHERE_THE_TIME_GOES,
            "",
        ]
    if run.contention is not None:
        doc += [
            "## 3. Contention on one key",
            "",
            "`python -m benchmarks.contention`",
            "",
            *_plots_for(contention.plot, run.contention, images, output, "contention"),
            "",
            contention.markdown(run.contention),
            "",
        ]
    if run.scale is not None:
        doc += [
            "## 4. State scale",
            "",
            "`python -m benchmarks.state_scale`",
            "",
            *_plots_for(state_scale.plot, run.scale, images, output, "state scale"),
            "",
            state_scale.markdown(run.scale),
            "",
        ]
    if run.store is not None:
        doc += [
            "## 5. The rendezvous store",
            "",
            "`python -m benchmarks.store_wakeup`",
            "",
            *_plots_for(store_wakeup.plot, run.store, images, output, "store"),
            "",
            store_wakeup.markdown(run.store),
            "",
        ]
    doc += [
        "## Reproducing",
        "",
        "```sh",
        "make bench          # this document: python -m benchmarks (installs the bench extra)",
        "make bench-quick    # a few minutes: benchmarks/results/benchmarks-quick.md",
        "python -m benchmarks --render-only   # rewrite this document from the last raw results",
        "python -m benchmarks.backend_calls   # one topic alone, into benchmarks/results/",
        "python -m benchmarks.rendezvous --sizes 8 32 --lever-sizes 32 --trials 5",
        "python -m benchmarks.contention",
        "python -m benchmarks.state_scale",
        "python -m benchmarks.store_wakeup",
        "```",
        "",
        "The `bench` extra (`pip install -e '.[bench]'`) brings python-etcd (torch's etcd-v2 "
        "backend needs it) and matplotlib. Without python-etcd the etcd-v2 variants are "
        "skipped, without matplotlib the plots; the document says so.",
        "",
    ]
    return "\n".join(doc)


RENDEZVOUS_INTRO = (
    "N agent processes started together (min_nodes = max_nodes = N) meet through torch's "
    "`DynamicRendezvousHandler` over each backend; the clock starts at a common instant after "
    "the agents' imports and connections, and stops when the last agent returns from "
    "`next_rendezvous()`. The agents run on this machine's cores, all of them: at N = 64, 64 "
    "Python processes share 2 cores with etcd, which is not how a job runs (one agent per "
    "host), so the large-N figures measure CPU contention among the agents as much as the "
    "backends."
)

WHERE_THE_TIME_GOES = [
    "- **The 1 s poll.** torch's stock handler (`wait=poll`; etcd-v2 and c10d always) sleeps "
    "a fixed second whenever it has to wait for other agents, and its state holder serves "
    "reads from a 1 s cache. Every agent but the one that completes the round sleeps at least "
    "once, so a rendezvous of the stock handler takes about 1 s plus the rest, whatever the "
    "backend, and a join phase longer than a second costs a second poll (the time is "
    "quantized in seconds). At small N the backends differ by milliseconds inside that "
    "second. `wait=watch` replaces the sleep by an etcd watch.",
    "- **The round-0 jitter.** torch sleeps a random 0 to 0.3 s before an agent's first "
    "round (`_delay((0, 0.3))`), to spread the agents; the slowest agent's share of it is "
    "about the largest of N uniform draws, so close to 0.3 s from N = 8 on. With "
    "`wait=watch` it is most of what is left at small N.",
    "- **CAS collisions.** Every agent joins with a compare-and-swap of the whole state; on "
    "a conflict torch's handler retries at once with the state it got back, so agents that "
    "arrive together retry in a crowd and the conflicts grow faster than N. Each attempt "
    "costs the agent CPU (unpickling and pickling the state; torch logs every step through "
    "`inspect.stack()`, about 1 ms) and a round trip; with 32 to 64 agents on 2 cores the "
    "crowd slows every agent's CPU, every call takes longer, the window for the next "
    "collision widens, and the conflicts feed themselves. A backend whose calls are short "
    "collides less: c10d's compare-and-swap is an in-memory TCPStore operation (tens of µs), "
    "an etcd write is a fsynced, replicated one. etcd-v3's conflicted write returns the "
    "current state in the same round trip, so the retry comes at once; etcd-v2's conflict "
    "path re-reads first, one more round trip that spreads its retries like a small backoff. "
    "`conflict_backoff` is that pause, chosen: a random wait up to the backoff, then a fresh "
    "read.",
    "- **The store.** After the join, every agent reads MASTER_ADDR/MASTER_PORT from the "
    "rendezvous store; rank 0 writes them once it has seen the round complete. If rank 0 was "
    "asleep in a 1 s poll or still waking, the others wait for it there: the \"store\" time.",
    "- **wait=watch at large N.** Each write of the state wakes every waiting agent, and "
    "each re-reads the state: N agents make on the order of N² reads. With one host per "
    "agent that is cheap; with 32 to 64 agents on 2 cores every write wakes 32 to 64 Python "
    "processes that compete for the CPU with the agents still joining: the \"watch waits\" "
    "and \"backend calls\" time of the watch rows. That is why `wait=watch` loses its lead "
    "at N = 64 here.",
]

def _lever_summary(run: Run) -> list[str]:
    """Whether ``conflict_backoff`` wins at every N (the condition for making it the default)."""
    if run.rendezvous is None or not run.rendezvous.lever_sizes:
        return []
    verdict_lines = rendezvous.lever_verdicts(run.rendezvous)
    if not verdict_lines:
        return []
    return ["The collision lever, `conflict_backoff` (it becomes the default only if it cuts "
            "the time to rendezvous at every N; time with it over time without, per-trial "
            "medians; the table is in section 2):", "", *verdict_lines, ""]


def _facts(run: Run) -> dict[str, str]:
    """Figures of this run that the missed-target notes quote."""
    facts: dict[str, str] = {}
    calls = run.calls
    if calls is not None:
        for key, family, op in (("v2_get", ETCD_V2, "get_state"),
                                ("v2_stale", ETCD_V2, "set_state stale"),
                                ("raw_stale", "raw", "set_state stale"),
                                ("raw_get", "raw", "get_state"),
                                ("shim_stale", "etcd-v3 shim", "set_state stale"),
                                ("shim_get", "etcd-v3 shim", "get_state"),
                                ("shim_set", "etcd-v3 shim", "set_state"),
                                ("raw_set", "raw", "set_state")):
            result = calls.get(family, op)
            if result is not None:
                facts[key] = f"{result.median / 1000:,.0f} µs"
                facts[key + "_ns"] = str(result.median)
        if "v2_stale_ns" in facts and "raw_stale_ns" in facts:
            facts["floor_ratio"] = \
                f"{float(facts['v2_stale_ns']) / float(facts['raw_stale_ns']):.2f}x"
    results = run.rendezvous
    if results is not None and results.sizes:
        n = max(results.sizes)
        facts["n_max"] = str(n)
        for key, label in (("c_poll", "etcd-v3 poll"), ("c_v2", ETCD_V2), ("c_c10d", C10D),
                           ("c_poll_05", "etcd-v3 poll, backoff 0.05"),
                           ("c_watch", "etcd-v3 watch")):
            trials = results.of(label, n)
            if trials:
                facts[key] = f"{_median(t.total('conflicts') for t in trials):.0f}"
        trials_10 = results.of("etcd-v3 poll, backoff 0.1", n)
        if trials_10:
            facts["c_poll_10"] = f"{_median(t.total('conflicts') for t in trials_10):.0f}"
        noise, worse = [], []
        for size in results.sizes:
            ratio = results.paired("etcd-v3 poll", C10D, size)
            if ratio is None:
                continue
            if ratio.median <= 1.05:
                noise.append(f"N={size}: {ratio.median:.2f}x")
            else:
                mine = _median(t.total("conflicts") for t in results.of("etcd-v3 poll", size))
                theirs = _median(t.total("conflicts") for t in results.of(C10D, size))
                worse.append(f"N={size}: {ratio.median:.2f}x ({mine:.0f} against {theirs:.0f})")
        facts["poll_noise"] = ", ".join(noise) or "no N"
        facts["poll_worse"] = ", ".join(worse) or "no N"
        poll, watch = results.of("etcd-v3 poll", n), results.of("etcd-v3 watch", n)
        if poll:
            facts["s_calls"] = f"{_median(t.slowest.counts.calls for t in poll):.0f}"
        if watch:
            facts["w_gets"] = f"{_median(t.total('gets') for t in watch):.0f}"
    return facts


def _missed_notes(run: Run) -> list[str]:
    """For each missed target: by how much, why, and what would close it."""
    notes: list[str] = []
    facts = _facts(run)
    for item in verdicts(run):
        if item.met is not False:
            continue
        text = MISSED.get(_target_key(item.target))
        body = ["(No analysis recorded for this target.)"] if text is None else \
            [line.format_map(_Default(facts)) for line in text]
        notes += [f"**Missed: {item.target}** — measured {item.measured}; {item.gap}.", "",
                  *body, ""]
    return notes


class _Default(dict[str, str]):
    """Formats a missing figure as "n/a" rather than failing."""

    def __missing__(self, key: str) -> str:
        return "n/a"


def _target_key(target: str) -> str:
    for key in MISSED:
        if key in target:
            return key
    return target


#: Why each target can be missed on this machine and what would close it; shown only for a
#: target this run missed, with this run's figures filled in.
MISSED: dict[str, list[str]] = {
    "sync shim": [
        "Why: the shim runs each call's coroutine on the process's event-loop thread and "
        "waits for it (`asyncio.run_coroutine_threadsafe`, then a `concurrent.futures` "
        "result): two thread hand-offs per call, on a machine whose 2 cores are shared. "
        "Here a shim get_state took {shim_get} against {raw_get} for the raw get, a shim "
        "set_state {shim_set} against {raw_set} for the raw Txn; the async backend itself "
        "matches its floors (ratios about 1.0 above), so the gap is the hand-off alone.",
        "",
        "What would close it: a sync path that does not cross threads, e.g. the shim "
        "issuing the one `Range` or `Txn` through grpc's synchronous stub from the calling "
        "thread (torch's handler calls from a thread with no event loop), keeping the async "
        "core for retries, leases and watches; or a cheaper wake-up of the loop thread.",
    ],
    "set_state on conflict": [
        "Why: the target assumes the round trip dominates a call. On loopback it does not: "
        "one etcd-v2 round trip (a get_state) took {v2_get} here, while etcd-v3's "
        "one-round-trip conflict path took {shim_stale} through the shim and {raw_stale} "
        "as a raw aetcd Txn: gRPC's Python client (protobuf, the asyncio channel) costs "
        "more per call than python-etcd's HTTP/JSON on a local socket. etcd-v2's conflict "
        "path took {v2_stale}, two round trips; even a client with no overhead over the raw "
        "Txn would be {floor_ratio} faster, not 2x.",
        "",
        "What would close it: across hosts, where the network round trip (hundreds of µs "
        "and more) outweighs the client, etcd-v2's second round trip shows in full and the "
        "ratio tends to 2x; on one host, a leaner client call (grpc's synchronous stub, no "
        "thread hop: see the shim target).",
    ],
    "c10d at every N (etcd-v3 poll)": [
        "Why: where the ratio is within 5% of 1 ({poll_noise}), every backend waits out "
        "torch's 1 s poll and they differ by milliseconds inside that second. Where "
        "etcd-v3 is slower ({poll_worse}; conflicts per rendezvous, etcd-v3 against c10d, "
        "in brackets), the agents' compare-and-swaps collide (see \"Where the "
        "time goes\"): at N = {n_max}, {c_poll} conflicts for etcd-v3 against {c_c10d} for "
        "c10d and {c_v2} for etcd-v2, and the last agents to get in retry over and over "
        "(the slowest made {s_calls} backend calls). A c10d attempt is an in-memory "
        "TCPStore operation, an etcd attempt a fsynced write; etcd-v3 hands a conflicted "
        "agent the current state at once, so it retries at once, where etcd-v2 re-reads "
        "first; and with the agents and etcd on 2 cores every attempt also waits for a CPU. "
        "Longer attempts collide more, and the collisions feed themselves.",
        "",
        "What would close it: fewer collisions. `conflict_backoff` cut them to {c_poll_05} "
        "at 0.05 s and {c_poll_10} at 0.1 s (the lever table); torch's own remedy, its 0 to "
        "0.3 s round-0 jitter, is too narrow for 64 agents. On a real cluster (one agent "
        "per host) the CPU contention that feeds the collisions here is gone.",
    ],
    "c10d at every N (etcd-v3 watch)": [
        "Why: `wait=watch` beats c10d by skipping torch's 1 s poll up to N = 32, but each "
        "write of the state wakes every waiting agent and each re-reads it: {w_gets} "
        "get_state calls per rendezvous at N = {n_max}. With one host per agent that is "
        "cheap; with {n_max} Python processes and etcd on 2 cores, the woken agents take "
        "the CPU from those still joining, whose compare-and-swaps then collide "
        "({c_watch} conflicts).",
        "",
        "What would close it: fewer wake-ups per write: take the state from the watch event "
        "rather than re-reading it (the store's blocking get already does), or wake the "
        "waiting agents only on the changes they act on (the round completing, a deadline); "
        "and `conflict_backoff` against the collisions. On a real cluster the wake-ups cost "
        "one read per host.",
    ],
    "collision lever": [
        "Why: c10d's rendezvous at N = 32 is its 1 s poll plus torch's round-0 jitter (up "
        "to 0.3 s); half of it leaves, after that jitter, a few hundred ms for 32 joins, "
        "the wake-ups and the store. `wait=watch` gets under the poll, but each write wakes "
        "the 31 waiting Python processes on 2 cores, and their re-reads slow the joins still "
        "going on (the watch rows of the breakdown: watch waits and backend calls of the "
        "slowest agent). The backoff trims the conflicts but not the wake-ups.",
        "",
        "What would close it: fewer wake-ups per write in `wait=watch` (the state from the "
        "watch event, no re-read; or wake only on the changes the waiting agents act on), "
        "and on a real cluster, one agent per host.",
    ],
    "state capacity": [
        "Why: the capacity is the request limit divided by the compressed bytes per node, "
        "and torch's state pickles each node's descriptor and heartbeat timestamp separately.",
        "",
        "What would close it: a higher zlib level (6: a little smaller, four times slower), "
        "or raising etcd's `--max-request-bytes` together with `max_request_bytes`.",
    ],
}


# --- entry point --------------------------------------------------------------------------


def _raw_path(quick: bool) -> Path:
    return RESULTS_DIR / ("benchmarks-quick.pickle" if quick else "benchmarks.pickle")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="the quick mode of every topic (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=TOPICS, default=list(TOPICS),
                        help="run these topics only")
    parser.add_argument("--output", type=Path, default=None,
                        help="the document (default: docs/benchmarks.md; quick: "
                             "benchmarks/results/benchmarks-quick.md)")
    parser.add_argument("--images", type=Path, default=None,
                        help="where the plots go (default: docs/img/benchmarks/; quick: "
                             "benchmarks/results/benchmarks-quick/)")
    parser.add_argument("--raw", type=Path, default=None,
                        help="where the raw results are kept (default: benchmarks/results/"
                             "benchmarks.pickle; quick: benchmarks-quick.pickle)")
    parser.add_argument("--render-only", action="store_true",
                        help="write the document from the last run's raw results")
    args = parser.parse_args(args_list)
    output = args.output or (QUICK_OUTPUT if args.quick else FULL_OUTPUT)
    images = args.images or (QUICK_IMAGES if args.quick else FULL_IMAGES)
    raw = args.raw or _raw_path(args.quick)
    if args.render_only:
        with raw.open("rb") as file:
            run: Run = pickle.load(file)
    else:
        run = Run(quick=args.quick,
                  command=shlex.join(["python", "-m", "benchmarks", *args_list]))
        with exit_on_sigterm():
            measure(run, args.only)
        raw.parent.mkdir(parents=True, exist_ok=True)
        with raw.open("wb") as file:
            pickle.dump(run, file)
    text = render(run, output, images)
    write_text(output, text)
    print(text)
    _say(f"written: {output} (plots in {images})")
    return 0
