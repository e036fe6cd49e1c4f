"""Any set of benchmark topics in one run, written up as one Markdown report with plots.

    python -m benchmarks [--quick] [--only calls rendezvous contention scale store
                                           join-scale steady growth]
                         [--output PATH] [--images DIR] [--raw PATH] [--render-only]
    python -m benchmarks.<module> [--quick] [the topic's options] [--output PATH] ...

``python -m benchmarks`` (``make bench``) runs the seven published topics and writes
``docs/benchmarks.md`` and ``docs/img/benchmarks/*.png``; ``--quick`` (``make bench-quick``, a
few minutes) writes ``benchmarks/results/benchmarks-quick.md`` and its plots beside it, so
that a quick run never replaces the published figures. ``python -m benchmarks.<module>`` runs
one topic with its own options into ``benchmarks/results/<topic>.md``. The raw results are
kept (``benchmarks/results/*.pickle``, git-ignored): ``--render-only`` writes the report
again from them without measuring. The prose is ``benchmarks/report.md.in``; the figures come
from the topics (:class:`~benchmarks._common.Topic`).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import (
    _plots,
    backend_calls,
    contention,
    history_growth,
    join_scale,
    rendezvous,
    state_scale,
    steady_state,
    store_wakeup,
)
from ._common import (
    RESULTS_DIR,
    Topic,
    Verdict,
    add_settings,
    exit_on_sigterm,
    machine_description,
    now_utc,
    settings_from,
    write_text,
)

__all__ = ["PUBLISHED", "TOPICS", "main", "render"]

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "report.md.in"
#: Every topic, in the report's order.
TOPICS: dict[str, Topic[Any, Any]] = {topic.name: topic for topic in (
    backend_calls.TOPIC, rendezvous.TOPIC, contention.TOPIC, state_scale.TOPIC,
    store_wakeup.TOPIC, join_scale.TOPIC, steady_state.TOPIC, history_growth.TOPIC)}
#: What ``make bench`` runs and docs/benchmarks.md shows.
PUBLISHED = ("calls", "rendezvous", "contention", "scale", "store", "join-scale", "steady")


@dataclass
class Run:
    """What one run measured, topic by topic, and how."""

    quick: bool
    command: str
    runner: bool
    """Whether it is ``python -m benchmarks`` (``make bench``), not one topic's module."""
    started: str = field(default_factory=now_utc)
    seconds: dict[str, float] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    machine: list[str] = field(default_factory=list)


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def measure(run: Run, settings: Mapping[str, Any]) -> None:
    """Collect each topic of ``settings`` (topic name to its settings) in turn."""
    for name, chosen in settings.items():
        _say(f"{name}: starting")
        started = time.monotonic()
        run.results[name] = TOPICS[name].collect(chosen, _say)
        run.seconds[name] = time.monotonic() - started
        _say(f"{name}: done in {run.seconds[name]:.0f} s")
    run.machine = machine_description()


# --- the report ---------------------------------------------------------------------------


class _Figures(dict[str, str]):
    """A figure the run did not measure reads "n/a" rather than failing."""

    def __missing__(self, key: str) -> str:
        return "n/a"


def _fill(block: str, figures: Mapping[str, str]) -> str:
    return block.format_map(_Figures(figures)).strip("\n")


def template_blocks(path: Path = TEMPLATE) -> dict[str, str]:
    """The template's blocks by name (see the comment at its top)."""
    parts = re.split(r"^<!-- block: (.+) -->$", path.read_text(encoding="utf-8"), flags=re.M)
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def verdict_table(items: Sequence[Verdict]) -> str:
    lines = ["| target | measured (ratios from this run) | result |", "|---|---|---|"]
    for item in items:
        result = "not measured" if item.met is None else \
            ("met" if item.met else f"**missed**: {item.gap}")
        lines.append(f"| {item.target} | {item.measured} | {result} |")
    return "\n".join(lines)


def _plots_for(topic: Topic[Any, Any], results: Any, images: Path, output: Path) -> str:
    if topic.plot is None:
        return ""
    reason = _plots.unavailable()
    if reason is not None:
        return f"(No plot: {reason}.)"
    # Relative to the report, so that it reads the same on every machine.
    return "\n".join(
        f"![{path.stem.replace('_', ' ')}]({Path(os.path.relpath(path, output.parent)).as_posix()})"
        for path in topic.plot(results, images))


def render(run: Run, output: Path, images: Path) -> str:
    blocks = template_blocks()
    ran = [name for name in TOPICS if name in run.results]
    verdicts = [v for name in ran for v in TOPICS[name].verdicts(run.results[name])]
    facts: dict[str, str] = {}
    for name in ran:
        facts.update(TOPICS[name].facts(run.results[name]))
    fragments = {name: TOPICS[name].fragments(run.results[name]) for name in ran}
    sections = [_fill(blocks[name], {
        "plots": _plots_for(TOPICS[name], run.results[name], images, output),
        **fragments[name]}) for name in ran]
    missed = [_fill(blocks["missed"], {
        "target": v.target, "measured": v.measured, "gap": v.gap,
        "why": _fill(blocks.get(f"missed: {v.key}", "(No analysis recorded for this target.)"),
                     facts),
    }) for v in verdicts if v.met is False]
    lever = fragments.get("rendezvous", {}).get("lever_verdicts", "")
    make = "make bench-quick" if run.quick else "make bench"
    text = _fill(blocks["document"], {
        "generated_by": f"`{make}` (`{run.command}`)" if run.runner else f"`{run.command}`",
        "mode": "quick" if run.quick else "full",
        "started": run.started,
        "minutes": f"{sum(run.seconds.values()) / 60:.1f}",
        "topic_seconds": ", ".join(f"{name} {s:.0f} s" for name, s in run.seconds.items()),
        "machine": "\n".join(run.machine),
        "targets": verdict_table(verdicts) if verdicts else "(No target among these topics.)",
        "lever_summary": _fill(blocks["lever summary"], {"lever_verdicts": lever})
        if lever else "",
        "missed": "\n\n".join(missed),
        "sections": "\n\n".join(sections),
    })
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


# --- entry point --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None, topic: str | None = None) -> int:
    """``python -m benchmarks`` (every published topic), or one ``topic`` alone."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    module = "benchmarks" if topic is None else TOPICS[topic].module
    parser = argparse.ArgumentParser(prog=f"python -m {module}",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick settings (minutes)")
    if topic is None:
        parser.add_argument("--only", nargs="+", choices=list(TOPICS), default=PUBLISHED,
                            help=f"run these topics (default: {' '.join(PUBLISHED)})")
    else:
        add_settings(parser, TOPICS[topic].full, TOPICS[topic].quick)
    parser.add_argument("--output", type=Path, default=None,
                        help="the report (default: docs/benchmarks.md for a full run of "
                             "every topic, else benchmarks/results/<name>.md)")
    parser.add_argument("--images", type=Path, default=None,
                        help="where the plots go (default: docs/img/benchmarks/, else "
                             "benchmarks/results/<name>/)")
    parser.add_argument("--raw", type=Path, default=None,
                        help="where the raw results are kept (default: "
                             "benchmarks/results/<name>.pickle)")
    parser.add_argument("--render-only", action="store_true",
                        help="write the report from the last run's raw results")
    args = parser.parse_args(args_list)
    published = topic is None and not args.quick
    name = (topic or "benchmarks") + ("-quick" if args.quick else "")
    output = args.output or (ROOT / "docs" / "benchmarks.md" if published
                             else RESULTS_DIR / f"{name}.md")
    images = args.images or (ROOT / "docs" / "img" / "benchmarks" if published
                             else RESULTS_DIR / name)
    raw = args.raw or RESULTS_DIR / f"{name}.pickle"
    if args.render_only:
        with raw.open("rb") as file:
            run: Run = pickle.load(file)
    else:
        run = Run(quick=args.quick, runner=topic is None,
                  command=shlex.join(["python", "-m", module, *args_list]))
        if topic is None:
            settings = {n: TOPICS[n].quick if args.quick else TOPICS[n].full for n in args.only}
        else:
            base = TOPICS[topic].quick if args.quick else TOPICS[topic].full
            settings = {topic: settings_from(args, base)}
        with exit_on_sigterm():
            measure(run, settings)
        raw.parent.mkdir(parents=True, exist_ok=True)
        with raw.open("wb") as file:
            pickle.dump(run, file)
    text = render(run, output, images)
    write_text(output, text)
    print(text)
    _say(f"written: {output} (plots in {images})")
    return 0
