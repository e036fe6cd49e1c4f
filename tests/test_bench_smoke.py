"""The benchmark runs end to end (a few calls, one round), so that it cannot rot.

Nothing about timings is checked: only that every variant ran and was reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import backend_calls
from etcd_rdzv.testing import EtcdServer

VARIANTS = [
    "raw txn",
    "raw get",
    "async get_state",
    "async set_state",
    "async set_state stale",
    "shim get_state",
    "shim set_state",
]


def test_quick_benchmark_reports_every_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    servers: list[EtcdServer] = []

    class RecordedServer(EtcdServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(backend_calls, "EtcdServer", RecordedServer)
    output = tmp_path / "results" / "backend_calls.md"

    assert backend_calls.main(
        ["--quick", "--calls", "2", "--rounds", "1", "--warmup", "1", "--output", str(output)]
    ) == 0

    assert output.is_file()
    text = output.read_text(encoding="utf-8")
    for name in VARIANTS:
        assert f"\n| {name} | 2 |" in text, f"no latency row for {name!r}:\n{text}"
    for name in VARIANTS[2:]:
        assert text.count(f"\n| {name} |") == 2, f"no ratio row for {name!r}:\n{text}"
    assert "--calls 2 --rounds 1" in text
    assert "etcd:" in text
    assert "| variant |" in capsys.readouterr().out
    assert len(servers) == 1
    assert not servers[0].member.running, "the benchmark left its etcd running"


def test_history_growth_benchmark_runs(tmp_path: Path) -> None:
    from benchmarks import history_growth

    output = tmp_path / "growth.md"
    assert history_growth.main(["--nodes", "10", "--writes", "4", "--output", str(output)]) == 0
    rows = [line for line in output.read_text().splitlines() if line.startswith("| 10 |")]
    assert len(rows) == 2  # compaction off and on


def test_store_wakeup_benchmark_runs(tmp_path: Path) -> None:
    from benchmarks import store_wakeup

    output = tmp_path / "wakeup.md"
    assert store_wakeup.main(["--rounds", "2", "--batches", "1", "--output", str(output)]) == 0
    text = output.read_text()
    assert "| TCPStore | 2 |" in text
    assert "| EtcdStore | 2 |" in text


@pytest.mark.slow
def test_linearizability_soak_runs_and_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import linearizability_soak

    assert linearizability_soak.main(["--seconds", "4", "--clients", "3"]) == 0
    out = capsys.readouterr().out
    assert "violations: 0" in out
    assert "operations checked:" in out
