"""What a simulated run found, and how a violation is shown: the seed, the history of the
offending round (the checker's events) and the steps of the nodes involved and of the node
that sealed the round (each node's trace: the rules' steps, its calls' faults, the changes
its watch showed), merged in time order, so the interleaving that broke an invariant reads
top to bottom."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from etcd_rdzv.native.decide import Step
from etcd_rdzv.native.model import Seal

from ..soak import HISTORY_LINES, Violation

if TYPE_CHECKING:
    from .config import SimConfig
    from .run import Simulation

__all__ = ["SimReport", "describe_violations", "show_step"]


@dataclass(frozen=True)
class SimReport:
    """One simulated run."""

    config: SimConfig
    """Its shape and seed."""
    faults: Mapping[str, int]
    """Faults injected, by kind."""
    rounds_sealed: int
    """Rounds some node was admitted to."""
    admissions: int
    violations: tuple[Violation, ...]
    """Every invariant that did not hold, in the order seen."""
    heals: int
    """Bursts of faults the run settled after."""
    settled_after: float | None
    """The slowest heal, virtual seconds (None: one did not settle)."""
    virtual_seconds: float
    """The run's length on the virtual clock."""
    events: int
    """Callbacks the clock ran: the simulation's work."""
    details: str = ""
    """For each violation, its history."""

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        config = self.config
        faults = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items()))
        settled = ("never" if self.settled_after is None or math.isnan(self.settled_after)
                   else f"{self.settled_after:.1f} s")
        return (f"native simulation seed={config.seed}: {config.seconds:g} virtual s of faults "
                f"({sum(self.faults.values())}: {faults or 'none'}), {self.rounds_sealed} "
                f"rounds, {self.admissions} admissions, healed {self.heals} time(s), the "
                f"slowest after {settled}, {len(self.violations)} violation(s) "
                f"[min_nodes={config.min_nodes} max_nodes={config.max_nodes} "
                f"nodes={config.nodes} ttl={config.settings().node_ttl} "
                f"last_call_timeout={config.last_call_timeout:g}; {self.events} events]")

    def describe(self) -> str:
        """The summary, and for a failed run the seed, each violation and its history."""
        if self.ok:
            return self.summary()
        return "\n".join([
            self.summary(),
            f"FAILED with seed {self.seed} (rerun: python -m etcd_rdzv.testing.simulation "
            f"--seconds {self.config.seconds:g} --seed {self.seed} --verbose)",
            *(f"  {violation}" for violation in self.violations), self.details])


def describe_violations(sim: Simulation) -> str:
    """Each violation's window of history, with the involved nodes' steps woven in."""
    parts: list[str] = []
    for violation in sim.checker.violations:
        start, end = violation.window
        lines = [(event.at, f"{event}") for event in sim.checker.events_between(start, end)]
        sealer = sim.checks.sealers.get(violation.round) if violation.round else None
        for label in (*violation.nodes, *(() if sealer in (None, *violation.nodes)
                                          else (sealer,))):
            node = sim.nodes.get(label)
            if node is not None:
                lines += [(at, f"{at:9.3f}s    {label:<5} . {show_step(what)}")
                          for at, what in node.trace if start <= at <= end]
        lines.sort(key=lambda line: line[0])
        left_out = max(0, len(lines) - HISTORY_LINES)
        parts.append(f"--- {violation}\nhistory {start:.3f}s..{end:.3f}s"
                     + (f" ({left_out} earlier lines left out)" if left_out else "")
                     + " (events; '.' lines: a node's steps, faults and watch):")
        parts += [f"  {text}" for _, text in lines[left_out:]]
        parts.append(sim.keys_when.get(id(violation), ""))
    return "\n".join(parts)


def show_step(what: object) -> str:
    """A step as ``Join(round=3) [JOIN]``; anything else as it is."""
    if not isinstance(what, Step):
        return str(what)
    fields = ", ".join(f"{name}={_short(value)}" for name, value in vars(what).items()
                       if name != "rule")
    return f"{type(what).__name__}({fields}) [{what.rule.name}]"


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, Seal):
        return f"Seal(round={value.round}, cutoff={value.cutoff}, size={value.size})"
    return repr(value)
