"""What every benchmark shares: machine description, statistics, Markdown, signals, a loop.

Nothing here measures anything; see the topic modules and ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from etcd_rdzv.testing import find_etcd_binary

__all__ = [
    "RESULTS_DIR",
    "Loop",
    "Spread",
    "etcd_version",
    "exit_on_sigterm",
    "machine_description",
    "markdown_table",
    "non_negative",
    "now_utc",
    "package_version",
    "percentile",
    "positive",
    "positive_float",
    "write_text",
]

T = TypeVar("T")

#: Where each benchmark's own command writes its Markdown (git-ignored).
RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def etcd_version() -> str:
    """The first line of ``etcd --version``, e.g. ``3.5.1 (/path/to/etcd)``."""
    try:
        binary = find_etcd_binary()
        output = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return f"unknown ({exc})"
    first = output.strip().splitlines()[0] if output.strip() else "unknown"
    return f"{first.replace('etcd Version:', '').strip()} ({binary})"


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.0f} GiB RAM"
    return "unknown RAM"


def _load() -> str:
    with contextlib.suppress(OSError):
        return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return "load unknown"


def machine_description() -> list[str]:
    """Markdown bullets: CPUs, memory, load, OS, Python, etcd and the client packages."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpus = f"{os.cpu_count()} CPUs" + (f" ({affinity} usable)" if affinity is not None else "")
    return [
        f"- machine: {cpus}, {_cpu_model()}, {_memory()}, {platform.machine()}, "
        f"{platform.platform()}; {_load()} when the report was written",
        f"- python: {platform.python_implementation()} {platform.python_version()}",
        f"- etcd: {etcd_version()}, one member on loopback, fsync on",
        f"- aetcd {package_version('aetcd')}, grpcio {package_version('grpcio')}, "
        f"torch {package_version('torch')}, python-etcd {package_version('python-etcd')}, "
        f"urllib3 {package_version('urllib3')}",
    ]


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def publish(path: Path, text: str) -> None:
    """Write a benchmark's report to ``path`` and show it."""
    write_text(path, text)
    print(text)
    print(f"Written to {path}")


def progress(line: str) -> None:
    """A progress line, on stderr so that the report on stdout stays clean."""
    print(line, file=sys.stderr, flush=True)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


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
