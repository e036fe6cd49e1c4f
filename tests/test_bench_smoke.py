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
