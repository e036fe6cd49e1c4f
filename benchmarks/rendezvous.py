"""Time to rendezvous through torch's ``DynamicRendezvousHandler``, N agents, per backend.

    python -m benchmarks.rendezvous [--quick] [--sizes 2 8 32 64] [--lever-sizes 8 32 64]
                                    [--backoffs 0.02 0.05] [--trials 3]

N agent processes (``min_nodes = max_nodes = N``) meet through torch's own handler over:
etcd-v3 (this project; ``wait=poll``, torch's stock handler, and ``wait=watch``, the fast
handler, when it is available), torch's etcd-v2 (python-etcd, against the same etcd 3.5 with
``--enable-v2=true``) and torch's c10d (a ``TCPStore`` served by this process). With the
collision lever, etcd-v3 runs again with ``conflict_backoff`` at each ``--backoffs`` value.

The agents are one :class:`~etcd_rdzv.testing.agents.AgentPool` started once (64 processes
importing torch on 2 cores take about a minute): each trial builds a fresh handler in every
agent (new run id, so round 0),
then all agents start ``next_rendezvous()`` at one instant of the shared monotonic clock
after their imports and connections are done. A trial's time is from that instant until the
last agent returns from ``next_rendezvous()`` (which includes reading MASTER_ADDR from the
rendezvous store). Variants are interleaved, their order rotated from trial to trial.

Each agent's backend is wrapped in a counting proxy (a subclass of torch's
``RendezvousBackend`` that delegates): it counts ``get_state``/``set_state`` calls and the
conflicted ``set_state`` calls (``has_set=False``) and times them. Each agent also times the
sleeps of torch's handler (its ``_delay``: the 0 to 0.3 s round-0 jitter and the 1 s poll) by
wrapping that function in the agent process only.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etcd_rdzv.testing import agents
from etcd_rdzv.testing.agents import AgentPool, AgentResult, AgentSpec, RendezvousFailed

from . import _backends, _plots
from ._backends import C10D, ETCD_V2, ETCD_V3, BenchServers, CallCounts
from ._common import Spread, Topic, Verdict, markdown_table, option

if TYPE_CHECKING:
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

__all__ = ["TOPIC", "RendezvousResults", "Settings", "Variant", "collect"]

#: Bounds on one trial; a rendezvous that takes this long has failed.
JOIN_TIMEOUT = 120
#: The collision lever's target: at this N, at most this fraction of c10d's time.
LEVER_TARGET = 0.5
LEVER_N = 32
#: The native handler's targets: at most this many seconds at this N, and at most this
#: fraction of c10d's time at these N.
NATIVE = "native"
NATIVE_SECONDS, NATIVE_SECONDS_N = 0.1, 8
NATIVE_C10D_TARGET, NATIVE_C10D_N = 0.5, (32, 64)


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = option((2, 8, 32, 64), "agent counts (min_nodes = max_nodes = N)")
    lever_sizes: tuple[int, ...] = option((8, 32, 64), "agent counts of the conflict_backoff runs")
    backoffs: tuple[float, ...] = option((0.02, 0.05, 0.1), "conflict_backoff values, seconds",
                                         low=0.001)
    trials: int = option(5, "trials per variant and size")


QUICK = Settings(sizes=(2, 8, 32), lever_sizes=(8, 32), trials=1)


@dataclass(frozen=True)
class Variant:
    """One way of running the rendezvous: a backend kind and its options."""

    label: str
    kind: str
    watch: bool = False
    backoff: float = 0.0
    native: bool = False
    """etcd-v3 with ``handler=native`` rather than torch's handler."""

    @property
    def family(self) -> str:
        """The variant without the lever: ``etcd-v3 poll``, ``etcd-v3 watch``, ``native``..."""
        if self.native:
            return NATIVE
        if self.kind != ETCD_V3:
            return self.kind
        return "etcd-v3 watch" if self.watch else "etcd-v3 poll"

    @property
    def torch_handler(self) -> bool:
        """Whether torch's handler runs it (so its backend calls and sleeps are counted)."""
        return not self.native

    def config(self, timeout: int) -> dict[str, object]:
        options: dict[str, object] = {"join_timeout": timeout, "close_timeout": timeout}
        if self.native:
            options["handler"] = "native"
        elif self.kind == ETCD_V3:
            options["wait"] = "watch" if self.watch else "poll"
            if self.backoff:
                options["conflict_backoff"] = self.backoff
        if self.kind == C10D:
            options["is_host"] = False  # the TCPStore is served by the benchmark's process
        return options


def main_variants(watch: bool, v2: bool) -> list[Variant]:
    variants = [Variant(NATIVE, ETCD_V3, native=True), Variant("etcd-v3 poll", ETCD_V3)]
    if watch:
        variants.append(Variant("etcd-v3 watch", ETCD_V3, watch=True))
    if v2:
        variants.append(Variant("etcd-v2", ETCD_V2))
    variants.append(Variant("c10d", C10D))
    return variants


def lever_variants(watch: bool, backoffs: Sequence[float]) -> list[Variant]:
    variants = []
    for wait_watch in (False, True) if watch else (False,):
        for backoff in backoffs:
            mode = "watch" if wait_watch else "poll"
            variants.append(Variant(f"etcd-v3 {mode}, backoff {backoff:g}", ETCD_V3,
                                    watch=wait_watch, backoff=backoff))
    return variants


def watch_unavailable() -> str | None:
    """Why ``wait=watch`` cannot be measured here, or None."""
    try:
        from etcd_rdzv.elastic import fast_handler
    except Exception as exc:
        return f"etcd_rdzv.elastic.fast_handler does not import: {exc!r}"
    return fast_handler.why_unavailable()


# --- the agent process ------------------------------------------------------------------


@dataclass(frozen=True)
class AgentReport(AgentResult):
    """What one agent saw of one rendezvous, with its calls and torch's sleeps."""

    counts: CallCounts = field(default_factory=CallCounts)
    jitter: float = 0.0
    """Seconds slept in torch's round-0 jitter (``_delay((0, 0.3))``)."""
    poll_sleep: float = 0.0
    """Seconds slept in torch's 1 s polls (``_delay(1)``)."""
    polls: int = 0
    store: float = 0.0
    """Seconds in torch's ``RendezvousStoreInfo.build``: rank 0 sets MASTER_ADDR and
    MASTER_PORT in the rendezvous store, the others wait for them there."""
    native: float = 0.0
    """native: seconds in the async core's ``next_rendezvous`` (join, seal, rank)."""

    @property
    def other(self) -> float:
        """What is left: CPU (pickling, the handler, scheduling among N processes), store."""
        return self.seconds - self.jitter - self.poll_sleep - self.counts.call_seconds \
            - self.counts.wait_seconds - self.store - self.native


@dataclass
class _Sleeps:
    jitter: float = 0.0
    poll_sleep: float = 0.0
    polls: int = 0
    store: float = 0.0
    native: float = 0.0


# --- in the agent process: state in module globals between commands ----------------------

#: The current trial's sleeps, which the instrumented ``_delay`` and ``build`` add to.
_SLEEPS: list[_Sleeps] = []
#: The counting proxy around this agent's backend.
_PROXY: list[_backends.CountingBackend] = []
#: torch's handler sleeps through this module global of ``dynamic_rendezvous``...
_DELAY = "_delay"
#: ... and builds the MASTER_ADDR/MASTER_PORT exchange through this static method.
_BUILD = "build"


def _instrument_torch() -> None:
    """Time torch's ``_delay`` and ``RendezvousStoreInfo.build`` into :data:`_SLEEPS`.

    In the agent process only; both still do what they did.
    """
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous
    from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo

    delay: Callable[[float | tuple[float, float]], None] = getattr(dynamic_rendezvous, _DELAY)
    build: Callable[..., RendezvousStoreInfo] = RendezvousStoreInfo.build

    def timed_delay(seconds: float | tuple[float, float]) -> None:
        started = time.perf_counter()
        try:
            delay(seconds)
        finally:
            elapsed = time.perf_counter() - started
            if isinstance(seconds, tuple):
                _SLEEPS[0].jitter += elapsed
            else:
                _SLEEPS[0].poll_sleep += elapsed
                _SLEEPS[0].polls += 1

    def timed_build(*args: Any, **kwargs: Any) -> RendezvousStoreInfo:
        started = time.perf_counter()
        try:
            return build(*args, **kwargs)
        finally:
            _SLEEPS[0].store += time.perf_counter() - started

    setattr(dynamic_rendezvous, _DELAY, timed_delay)
    setattr(RendezvousStoreInfo, _BUILD, staticmethod(timed_build))


def counted_handler(params: RendezvousParameters) -> RendezvousHandler:
    """torch's handler (``wait=watch``: the fast one) over a counting proxy of the backend;
    with ``handler=native``, the native handler, its async core timed."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    from etcd_rdzv.elastic import fast_handler

    if params.get("handler", "torch") == NATIVE:
        _PROXY.clear()
        return timed_native_handler(params)
    backend, store = _backends.create_backend(params.backend, params)
    _PROXY[:] = [_backends.CountingBackend(backend)]
    if params.get("wait", "poll") != "watch":
        return dynamic_rendezvous.create_handler(store, _PROXY[0], params)
    handler = fast_handler.create_fast_handler(store, _PROXY[0], params)  # type: ignore[arg-type]
    if not fast_handler.is_fast_handler(handler):
        raise RuntimeError("wait=watch fell back to torch's stock handler: "
                           f"{fast_handler.why_unavailable(handler)}")
    return handler


def timed_native_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The native handler as ``create_handler`` builds it, its async core's
    ``next_rendezvous`` timed into :data:`_SLEEPS` (the handler adds the store exchange)."""
    from etcd_rdzv import Admission
    from etcd_rdzv.elastic import create_handler
    from etcd_rdzv.elastic.handler import NativeRendezvousHandler

    handler = create_handler(params)
    if not isinstance(handler, NativeRendezvousHandler):
        raise RuntimeError(f"handler=native built a {type(handler).__name__}")
    core = handler.async_rendezvous
    join = core.next_rendezvous

    async def timed_join() -> Admission:
        started = time.perf_counter()
        try:
            return await join()
        finally:
            _SLEEPS[0].native += time.perf_counter() - started

    core.next_rendezvous = timed_join  # type: ignore[method-assign]  # this instance only
    return handler


def agent_setup(spec: AgentSpec) -> None:
    """Build this agent's handler for a trial (instrumenting torch on first use)."""
    if not _SLEEPS:
        _SLEEPS.append(_Sleeps())
        _instrument_torch()
        gc.freeze()  # the imports' objects: each teardown's collection skips them
    agents.build_handler(spec)


def agent_join(start_at: float, dump_after: float) -> AgentReport:
    _SLEEPS[0] = _Sleeps()
    for proxy in _PROXY:
        proxy.reset()
    result = agents.next_rendezvous(start_at, dump_after)
    if isinstance(result, RendezvousFailed):
        raise RuntimeError(f"next_rendezvous raised {result.error}: {result.message}")
    sleeps = _SLEEPS[0]
    counts = _PROXY[0].snapshot() if _PROXY else CallCounts()
    return AgentReport(**vars(result), counts=counts, jitter=sleeps.jitter,
                       poll_sleep=sleeps.poll_sleep, polls=sleeps.polls, store=sleeps.store,
                       native=sleeps.native)


def agent_teardown() -> None:
    try:
        agents.shutdown_handler()
    finally:
        while _PROXY:
            _backends.close_backend(_PROXY.pop())
        agents.release_handler()


#: What the fork server imports once, so that each agent starts with torch imported.
PRELOAD = (*agents.PRELOAD, "torch.distributed.elastic.rendezvous.c10d_rendezvous_backend",
           "torch.distributed.elastic.rendezvous.etcd_rendezvous_backend", __name__)


def run_trial(pool: AgentPool, variant: Variant, n: int, endpoint: str,
              timeout: int = JOIN_TIMEOUT) -> list[AgentReport]:
    """One rendezvous of the pool's first ``n`` agents; their reports by agent index.

    An agent still in ``next_rendezvous()`` 10 s past ``timeout`` dumps its threads' stacks
    to stderr; 20 s past it, the trial fails (and the pool is stopped).
    """
    spec = AgentSpec(endpoint, f"bench-{uuid.uuid4().hex[:12]}", n, n, variant.config(timeout),
                     backend=variant.kind, factory=counted_handler)
    workers = range(n)
    pool.call(agent_setup, spec, workers=workers, timeout=120.0)
    # Everyone is connected and waiting; all start at one instant of the shared clock.
    start_at = time.monotonic() + 0.1 + 0.002 * n
    reports: list[AgentReport] = pool.call(agent_join, start_at, timeout + 10.0,
                                           workers=workers, timeout=timeout + 20.0)
    pool.call(agent_teardown, workers=workers, timeout=120.0)
    return reports


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    variant: Variant
    n: int
    index: int
    agents: list[AgentReport]

    @property
    def seconds(self) -> float:
        """Until the last agent returned."""
        return max(agent.seconds for agent in self.agents)

    @property
    def slowest(self) -> AgentReport:
        return max(self.agents, key=lambda agent: agent.seconds)

    def total(self, name: str) -> float:
        return float(sum(getattr(agent.counts, name) for agent in self.agents))


@dataclass
class RendezvousResults:
    trials: list[Trial] = field(default_factory=list)
    sizes: tuple[int, ...] = ()
    lever_sizes: tuple[int, ...] = ()
    backoffs: tuple[float, ...] = ()
    trial_count: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    pool_start_seconds: float = 0.0
    elapsed_seconds: float = 0.0

    def of(self, label: str, n: int) -> list[Trial]:
        return sorted((t for t in self.trials if t.variant.label == label and t.n == n),
                      key=lambda t: t.index)

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for trial in self.trials:
            seen.setdefault(trial.variant.label, None)
        return list(seen)

    def variant(self, label: str) -> Variant | None:
        return next((t.variant for t in self.trials if t.variant.label == label), None)

    def seconds(self, label: str, n: int) -> Spread | None:
        trials = self.of(label, n)
        return Spread.of(t.seconds for t in trials) if trials else None

    def paired(self, label: str, other: str, n: int) -> Spread | None:
        """Per trial index, this variant's time over the other's: median, min, max."""
        mine = {t.index: t.seconds for t in self.of(label, n)}
        theirs = {t.index: t.seconds for t in self.of(other, n)}
        ratios = [mine[i] / theirs[i] for i in mine if i in theirs]
        return Spread.of(ratios) if ratios else None


class RendezvousError(RuntimeError):
    """The agents of a trial did not end in one rendezvous."""


def _check(trial: Trial) -> None:
    ranks = sorted(agent.rank for agent in trial.agents)
    sizes = {agent.world_size for agent in trial.agents}
    rounds = {agent.round for agent in trial.agents}
    if ranks != list(range(trial.n)) or sizes != {trial.n} or len(rounds) != 1:
        raise RendezvousError(f"{trial.variant.label}, N={trial.n}: ranks {ranks}, world "
                              f"sizes {sorted(sizes)}, rounds {sorted(rounds)}: not one rendezvous")


def collect(settings: Settings, say: Callable[[str], None]) -> RendezvousResults:
    """Start etcd, a TCPStore and the agent pool; run every trial; stop them all."""
    sizes, lever_sizes, backoffs, trials = (settings.sizes, settings.lever_sizes,
                                            settings.backoffs, settings.trials)
    started = time.monotonic()
    skipped: dict[str, str] = {}
    watch_reason = watch_unavailable()
    if watch_reason is not None:
        skipped["etcd-v3 watch"] = watch_reason
    v2_reason = _backends.v2_unavailable()
    if v2_reason is not None:
        skipped[ETCD_V2] = v2_reason
    plain = main_variants(watch_reason is None, v2_reason is None)
    lever = lever_variants(watch_reason is None, backoffs)
    results = RendezvousResults(sizes=tuple(sizes), lever_sizes=tuple(lever_sizes),
                                backoffs=tuple(backoffs), trial_count=trials, skipped=skipped)
    with BenchServers() as servers, AgentPool(max([*sizes, *lever_sizes]), PRELOAD) as pool:
        results.pool_start_seconds = pool.start_seconds
        say(f"rendezvous: {pool.size} agent processes ready in "
            f"{results.pool_start_seconds:.1f} s")
        for n in sorted({*sizes, *lever_sizes}):
            variants = (plain if n in sizes else
                        [v for v in plain if v.kind == ETCD_V3 and v.torch_handler]) \
                + (lever if n in lever_sizes else [])
            for index in range(trials):
                shift = index % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    reports = run_trial(pool, variant, n, servers.endpoint(variant.kind))
                    trial = Trial(variant, n, index, reports)
                    _check(trial)
                    results.trials.append(trial)
                    say(f"rendezvous: N={n:<3} {variant.label:<28} trial {index + 1}: "
                        f"{trial.seconds:6.2f} s, {trial.total('calls'):4.0f} calls, "
                        f"{trial.total('conflicts'):4.0f} conflicts")
    results.elapsed_seconds = time.monotonic() - started
    return results


# --- report -------------------------------------------------------------------------------


def _cell(spread: Spread | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if spread is None else spread.format(digits=digits) + suffix


def _totals(trials: Sequence[Trial], name: str) -> Spread | None:
    return Spread.of(t.total(name) for t in trials) if trials else None


def _plain_labels(results: RendezvousResults) -> list[str]:
    return [label for label in results.labels()
            if (v := results.variant(label)) is not None and not v.backoff]


def time_table(results: RendezvousResults) -> str:
    labels = _plain_labels(results)
    others = [label for label in labels if label != C10D]
    header = ["N", *(f"{label} s" for label in labels),
              *(f"{label} / c10d" for label in others)]
    rows = []
    for n in results.sizes:
        rows.append([n, *(_cell(results.seconds(label, n)) for label in labels),
                     *(_cell(results.paired(label, C10D, n)) for label in others)])
    return markdown_table(header, rows)


def _torch_labels(results: RendezvousResults) -> list[str]:
    """The variants torch's handler runs (whose backend calls are counted)."""
    return [label for label in results.labels()
            if (v := results.variant(label)) is not None and v.torch_handler]


def calls_table(results: RendezvousResults) -> str:
    rows = []
    for label in _torch_labels(results):
        for n in sorted({*results.sizes, *results.lever_sizes}):
            trials = results.of(label, n)
            if not trials:
                continue
            rows.append([label, n, _cell(_totals(trials, "calls"), 0),
                         _cell(_totals(trials, "gets"), 0), _cell(_totals(trials, "sets"), 0),
                         _cell(_totals(trials, "conflicts"), 0),
                         _cell(_totals(trials, "waits"), 0),
                         f"{statistics.median(t.total('calls') for t in trials) / n:.1f}"])
    return markdown_table(["variant", "N", "backend calls", "get_state", "set_state",
                           "conflicts", "watch waits", "calls per agent"], rows, "lrrrrrrr")


def breakdown_table(results: RendezvousResults) -> str:
    """Where the slowest agent's time went, medians over the trials."""
    rows = []
    for label in results.labels():
        for n in sorted({*results.sizes, *results.lever_sizes}):
            trials = results.of(label, n)
            if not trials:
                continue
            slowest = [t.slowest for t in trials]

            def median(values: Iterator[float]) -> str:
                return f"{statistics.median(values):.2f}"

            if not trials[0].variant.torch_handler:
                rows.append([label, n, median(a.seconds for a in slowest), "-", "-", "-",
                             f"{median(a.native for a in slowest)} (core)", "-",
                             median(a.store for a in slowest),
                             median(a.other for a in slowest)])
                continue
            rows.append([
                label, n, median(a.seconds for a in slowest),
                median(a.jitter for a in slowest),
                f"{median(a.poll_sleep for a in slowest)} "
                f"({statistics.median(a.polls for a in slowest):.0f})",
                median(a.counts.wait_seconds for a in slowest),
                median(a.counts.call_seconds for a in slowest),
                f"{statistics.median(a.counts.calls for a in slowest):.0f}",
                median(a.store for a in slowest),
                median(a.other for a in slowest),
            ])
    return markdown_table(["variant", "N", "slowest agent s", "round-0 jitter s",
                           "1 s polls s (count)", "watch waits s", "backend calls s",
                           "its calls", "store s", "other s"], rows, "lrrrrrrrrr")


def lever_table(results: RendezvousResults) -> str:
    rows = []
    for family in ("etcd-v3 poll", "etcd-v3 watch"):
        if results.variant(family) is None:
            continue
        for n in results.lever_sizes:
            off = results.of(family, n)
            if not off:
                continue
            cells: list[object] = [family, n, _cell(results.seconds(family, n)),
                                   _cell(_totals(off, "conflicts"), 0)]
            for backoff in results.backoffs:
                label = f"{family}, backoff {backoff:g}"
                cells += [_cell(results.seconds(label, n)),
                          _cell(_totals(results.of(label, n), "conflicts"), 0),
                          _cell(results.paired(label, family, n))]
            rows.append(cells)
    header = ["wait", "N", "off: s", "off: conflicts"]
    for backoff in results.backoffs:
        header += [f"{backoff:g}: s", f"{backoff:g}: conflicts", f"{backoff:g}: time / off"]
    return markdown_table(header, rows, "lr" + "r" * (len(header) - 2))


def lever_verdicts(results: RendezvousResults) -> list[str]:
    """Per wait mode and backoff: does it cut the median time at every lever size?"""
    lines = []
    for family in ("etcd-v3 poll", "etcd-v3 watch"):
        for backoff in results.backoffs:
            label = f"{family}, backoff {backoff:g}"
            ratios = [(n, results.paired(label, family, n)) for n in results.lever_sizes]
            known = [(n, r) for n, r in ratios if r is not None]
            if not known:
                continue
            wins = all(r.median < 1.0 for _, r in known)
            detail = ", ".join(f"N={n}: {r.median:.2f}" for n, r in known)
            verdict = "wins at every N" if wins else "does not win at every N"
            unsure = [n for n, r in known if r.median < 1.0 <= r.high]
            if wins and unsure:
                verdict += (" by the median, but at N = " + ", ".join(map(str, unsure))
                            + " some trials were slower with it (within the trials' spread)")
            lines.append(f"- {label}: time / off {detail} → {verdict}")
    return lines


def _median(values: Iterator[float]) -> float:
    return float(statistics.median(values))


def _time_split(results: RendezvousResults) -> list[str]:
    """Bullets computed from the breakdown: the poll, the jitter, the conflicts, the rest."""
    lines = []
    for label in (v.label for v in main_variants(True, True)):
        parts = []
        for n in results.sizes:
            trials = results.of(label, n)
            if not trials:
                continue
            slowest = [t.slowest for t in trials]
            split = [("native core", _median(a.native for a in slowest)),
                     ("1 s polls", _median(a.poll_sleep for a in slowest)),
                     ("jitter", _median(a.jitter for a in slowest)),
                     ("backend calls", _median(a.counts.call_seconds for a in slowest)),
                     ("watch waits", _median(a.counts.wait_seconds for a in slowest)),
                     ("store", _median(a.store for a in slowest)),
                     ("other", _median(a.other for a in slowest))]
            shown = " + ".join(f"{name} {value:.2f}" for name, value in split if value >= 0.005)
            conflicts = "" if not trials[0].variant.torch_handler else \
                f" (conflicts: {_median(t.total('conflicts') for t in trials):.0f})"
            parts.append(f"N={n}: {_median(a.seconds for a in slowest):.2f} s ≈ {shown}"
                         + conflicts)
        if parts:
            lines.append(f"- {label}: " + "; ".join(parts))
    return lines


def _collisions(results: RendezvousResults) -> str:
    """The largest N: conflicts and per-call time of the slowest agent, per variant."""
    n = max(results.sizes)
    cells = []
    for label in _torch_labels(results):
        trials = results.of(label, n)
        if trials:
            slowest = [t.slowest for t in trials]
            per_call = _median(a.counts.call_seconds / max(1, a.counts.calls) for a in slowest)
            cells.append(f"{label} {_median(t.total('conflicts') for t in trials):.0f} "
                         f"conflicts, {_median(t.seconds for t in trials):.2f} s, "
                         f"{per_call * 1000:.1f} ms per backend call of the slowest agent")
    return f"At N = {n} (medians): " + "; ".join(cells) + "." if cells else ""


def fragments(results: RendezvousResults) -> dict[str, str]:
    return {
        "settings": "\n".join([
            f"- sizes: N = {', '.join(map(str, results.sizes))} (min_nodes = max_nodes = N); "
            f"the collision lever at N = {', '.join(map(str, results.lever_sizes))} with "
            f"conflict_backoff = {', '.join(f'{b:g}' for b in results.backoffs)} s; "
            f"{results.trial_count} trial(s) per variant and N, variants interleaved",
            f"- agent pool: {max([*results.sizes, *results.lever_sizes])} processes, ready in "
            f"{results.pool_start_seconds:.0f} s; the whole benchmark took "
            f"{results.elapsed_seconds:.0f} s",
            *(f"- skipped: {label}: {why}" for label, why in results.skipped.items())]),
        "time_table": time_table(results),
        "calls_table": calls_table(results),
        "breakdown_table": breakdown_table(results),
        "lever_table": lever_table(results),
        "lever_verdicts": "\n".join(lever_verdicts(results)),
        "time_split": "\n".join(_time_split(results)),
        "collisions": _collisions(results),
    }


def verdicts(results: RendezvousResults) -> list[Verdict]:
    """No worse than c10d at every N, per wait mode; the best lever variant at N = 32."""
    out = []
    for family in ("etcd-v3 poll", "etcd-v3 watch"):
        measured = [(n, r) for n in results.sizes
                    if (r := results.paired(family, C10D, n)) is not None]
        if not measured:
            continue
        worse = [(n, r) for n, r in measured if r.median > 1.0]
        out.append(Verdict(
            f"c10d {family}", f"time to rendezvous no worse than c10d at every N ({family})",
            ", ".join(f"N={n}: {r.median:.2f}x" for n, r in measured), not worse,
            "; ".join(f"N={n}: {(r.median - 1) * 100:.0f}% slower than c10d (per-trial "
                      f"range {r.low:.2f} to {r.high:.2f}"
                      + (", some trials faster)" if r.low <= 1.0 else ")")
                      for n, r in worse)))
    best: tuple[str, float] | None = None
    for label in results.labels():
        variant = results.variant(label)
        ratio = results.paired(label, C10D, LEVER_N) if variant and variant.backoff else None
        if ratio is not None and (best is None or ratio.median < best[1]):
            best = (label, ratio.median)
    out.append(Verdict(
        "lever", f"time to rendezvous at N = {LEVER_N} with the collision lever on at most "
        f"{LEVER_TARGET:g}x c10d's",
        "n/a" if best is None else f"{best[1]:.2f}x ({best[0]}, the best lever variant)",
        None if best is None else best[1] <= LEVER_TARGET,
        "" if best is None else
        f"{(best[1] / LEVER_TARGET - 1) * 100:.0f}% over the {LEVER_TARGET:g}x ceiling"))
    return out + native_verdicts(results)


def native_verdicts(results: RendezvousResults) -> list[Verdict]:
    """handler=native: at most 0.1 s at N = 8; at most 0.5x c10d's time at N = 32 and 64."""
    if results.variant(NATIVE) is None:
        return []
    spread = results.seconds(NATIVE, NATIVE_SECONDS_N)
    out = [Verdict(
        "native 8", f"native time to rendezvous at N = {NATIVE_SECONDS_N} at most "
        f"{NATIVE_SECONDS:g} s", "n/a" if spread is None else f"{spread.format(digits=3)} s",
        None if spread is None else spread.median <= NATIVE_SECONDS,
        "" if spread is None else
        f"{(spread.median / NATIVE_SECONDS - 1) * 100:.0f}% over {NATIVE_SECONDS:g} s")]
    ratios = [(n, r) for n in NATIVE_C10D_N if (r := results.paired(NATIVE, C10D, n)) is not None]
    over = [(n, r) for n, r in ratios if r.median > NATIVE_C10D_TARGET]
    unmeasured = [n for n in NATIVE_C10D_N if n not in dict(ratios)]
    out.append(Verdict(
        "native c10d", f"native time to rendezvous at most {NATIVE_C10D_TARGET:g}x c10d's at "
        f"N = {' and '.join(map(str, NATIVE_C10D_N))}",
        ", ".join([f"N={n}: {r.format()}x" for n, r in ratios]
                  + [f"N={n}: not measured" for n in unmeasured]),
        None if unmeasured else not over,
        "; ".join(f"N={n}: {r.median:.2f}x" for n, r in over)))
    return out


def facts(results: RendezvousResults) -> dict[str, str]:
    """Conflicts and calls at the largest N, and the ratios to c10d, for the notes."""
    if not results.sizes:
        return {}
    n = max(results.sizes)
    found = {"n_max": str(n)}

    def conflicts(label: str, size: int) -> float | None:
        trials = results.of(label, size)
        return _median(t.total("conflicts") for t in trials) if trials else None

    for key, label in (("c_poll", "etcd-v3 poll"), ("c_v2", ETCD_V2), ("c_c10d", C10D),
                       ("c_poll_05", "etcd-v3 poll, backoff 0.05"),
                       ("c_poll_10", "etcd-v3 poll, backoff 0.1"),
                       ("c_watch", "etcd-v3 watch")):
        if (count := conflicts(label, n)) is not None:
            found[key] = f"{count:.0f}"
    noise, worse = [], []
    for size in results.sizes:
        ratio = results.paired("etcd-v3 poll", C10D, size)
        if ratio is not None and ratio.median <= 1.05:
            noise.append(f"N={size}: {ratio.median:.2f}x")
        elif ratio is not None:
            worse.append(f"N={size}: {ratio.median:.2f}x ({conflicts('etcd-v3 poll', size):.0f} "
                         f"against {conflicts(C10D, size):.0f})")
    found["poll_noise"] = ", ".join(noise) or "no N"
    found["poll_worse"] = ", ".join(worse) or "no N"
    if poll := results.of("etcd-v3 poll", n):
        found["s_calls"] = f"{_median(t.slowest.counts.calls for t in poll):.0f}"
    if watch := results.of("etcd-v3 watch", n):
        found["w_gets"] = f"{_median(t.total('gets') for t in watch):.0f}"
    for size in sorted({NATIVE_SECONDS_N, *NATIVE_C10D_N, n}):
        if native := results.of(NATIVE, size):
            slowest = [t.slowest for t in native]
            found[f"native_{size}"] = (
                f"{_median(a.seconds for a in slowest):.3f} s (core "
                f"{_median(a.native for a in slowest):.3f} s, store "
                f"{_median(a.store for a in slowest):.3f} s, other "
                f"{_median(a.other for a in slowest):.3f} s)")
    return found


def _errorbars(results: RendezvousResults, label: str, ns: Sequence[int],
               value: Callable[[Trial], float]) -> tuple[list[int], list[float], list[list[float]]]:
    xs: list[int] = []
    medians: list[float] = []
    lows: list[float] = []
    highs: list[float] = []
    for n in ns:
        trials = results.of(label, n)
        if not trials:
            continue
        spread = Spread.of(value(t) for t in trials)
        xs.append(n)
        medians.append(spread.median)
        lows.append(spread.median - spread.low)
        highs.append(spread.high - spread.median)
    return xs, medians, [lows, highs]


def plot(results: RendezvousResults, directory: Path) -> list[Path]:
    plt = _plots.pyplot()
    paths = []
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in _plain_labels(results):
        color = _plots.COLORS.get(label.replace(" poll", ""), "#333333")
        xs, ys, err = _errorbars(results, label, results.sizes, lambda t: t.seconds)
        left.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, color=color)
        if label not in _torch_labels(results):
            continue  # no torch backend calls to count
        xs, ys, err = _errorbars(results, label, results.sizes, lambda t: t.total("calls"))
        right.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, color=color)
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(list(results.sizes), [str(n) for n in results.sizes])
        axes.set_xlabel("agents N (min = max = N)")
        axes.grid(alpha=0.3)
    left.set_ylabel("seconds to rendezvous (median, min to max)")
    left.set_ylim(bottom=0)
    right.set_ylabel("torch's handler: backend calls per rendezvous")
    right.set_yscale("log")
    left.legend(fontsize=8)
    figure.suptitle("Time to rendezvous: torch's DynamicRendezvousHandler per backend, and "
                    "the native handler")
    paths.append(_plots.save(figure, directory / "rendezvous_time.png"))

    if results.lever_sizes and results.backoffs:
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        styles = {0.0: "-", **{b: ls for b, ls in zip(results.backoffs, ("--", ":", "-."),
                                                      strict=False)}}
        for family in ("etcd-v3 poll", "etcd-v3 watch"):
            if results.variant(family) is None:
                continue
            color = _plots.COLORS.get(family.replace(" poll", ""), "#333333")
            for backoff in (0.0, *results.backoffs):
                label = family if not backoff else f"{family}, backoff {backoff:g}"
                for axes, value in ((left, lambda t: t.seconds),
                                    (right, lambda t: t.total("conflicts"))):
                    xs, ys, err = _errorbars(results, label, results.lever_sizes, value)
                    axes.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=color,
                                  linestyle=styles.get(backoff, "-"),
                                  label=f"{family}, backoff {backoff:g}")
        for axes in (left, right):
            axes.set_xscale("log", base=2)
            axes.set_xticks(list(results.lever_sizes), [str(n) for n in results.lever_sizes])
            axes.set_xlabel("agents N")
            axes.set_ylim(bottom=0)
            axes.grid(alpha=0.3)
        left.set_ylabel("seconds to rendezvous")
        right.set_ylabel("CAS conflicts per rendezvous")
        left.legend(fontsize=7)
        figure.suptitle("The collision lever: conflict_backoff")
        paths.append(_plots.save(figure, directory / "rendezvous_lever.png"))
    return paths


TOPIC: Topic[Settings, RendezvousResults] = Topic(
    "rendezvous", __name__, Settings(), QUICK, collect, fragments, plot, verdicts, facts)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))
