"""Every benchmark runs end to end on its smallest case, so that none can rot.

Nothing about timings is checked: only that every variant ran and was reported, and that
no server or process was left behind. The etcd-v2 variants need python-etcd (the ``bench``
extra); without it they must be reported as skipped.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest

from benchmarks import _backends, _plots, run_all
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.agents import AgentPool

HAVE_V2 = _backends.v2_unavailable() is None

ETCD_V3_VARIANTS = [
    "raw txn",
    "raw txn stale",
    "raw get",
    "async get_state",
    "async set_state",
    "async set_state stale",
    "shim get_state",
    "shim set_state",
    "shim set_state stale",
]
TORCH_VARIANTS = [f"{kind} {op}" for kind in ("etcd-v2", "c10d")
                  for op in ("get_state", "set_state", "set_state stale")]


@pytest.fixture
def recorded_servers(monkeypatch: pytest.MonkeyPatch) -> list[EtcdServer]:
    """Every etcd the benchmarks start, to check that each was stopped."""
    servers: list[EtcdServer] = []

    class RecordedServer(EtcdServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(_backends, "EtcdServer", RecordedServer)
    return servers


@pytest.fixture
def recorded_workers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of every worker process the benchmarks start."""
    pids: list[int] = []
    original = AgentPool.start

    def start(self: AgentPool, timeout: float = 600.0) -> None:
        try:
            original(self, timeout)
        finally:
            pids.extend(self.pids)

    monkeypatch.setattr(AgentPool, "start", start)
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def run_topic(topic: str, tmp_path: Path, *options: str) -> str:
    """Run one topic alone into ``tmp_path``; its report."""
    output = tmp_path / f"{topic}.md"
    assert run_all.main([*options, "--output", str(output), "--images", str(tmp_path / "img"),
                         "--raw", str(tmp_path / f"{topic}.pickle")], topic=topic) == 0
    return output.read_text(encoding="utf-8")


def raw_results(tmp_path: Path, topic: str) -> Any:
    """What :func:`run_topic` measured, as the topic's ``collect`` returned it."""
    with (tmp_path / f"{topic}.pickle").open("rb") as file:
        return pickle.load(file).results[topic]


def _all_stopped(servers: list[EtcdServer], workers: list[int]) -> None:
    assert servers, "no etcd was started"
    assert not any(server.member.running for server in servers), "an etcd was left running"
    assert all(_gone(pid) for pid in workers), "a worker process was left behind"


def test_backend_calls_reports_every_variant(
    tmp_path: Path, recorded_servers: list[EtcdServer], capsys: pytest.CaptureFixture[str]
) -> None:
    text = run_topic("calls", tmp_path, "--quick", "--calls", "2", "--rounds", "1",
                     "--warmup", "1")

    ran = ETCD_V3_VARIANTS + [v for v in TORCH_VARIANTS if HAVE_V2 or "etcd-v2" not in v]
    for name in ran:
        assert f"\n| {name} | 2 |" in text, f"no latency row for {name!r}:\n{text}"
    for name in ETCD_V3_VARIANTS[3:]:
        assert text.count(f"\n| {name} |") == 2, f"no ratio row for {name!r}:\n{text}"
    for call in ("get_state", "set_state", "set_state stale"):
        assert f"\n| `{call}` |" in text, f"no comparison row for {call}:\n{text}"
    if not HAVE_V2:
        assert "skipped: etcd-v2: python-etcd is not installed" in text
    assert "--calls 2 --rounds 1" in text
    assert "- etcd: 3." in text and "/etcd " not in text  # a version, not a path
    assert "| variant |" in capsys.readouterr().out
    assert len(recorded_servers) == 1
    _all_stopped(recorded_servers, [])


@pytest.mark.slow
def test_rendezvous_benchmark_runs(
    tmp_path: Path, recorded_servers: list[EtcdServer], recorded_workers: list[int]
) -> None:
    from benchmarks import rendezvous

    text = run_topic("rendezvous", tmp_path, "--sizes", "2", "--lever-sizes", "2",
                     "--backoffs", "0.05", "--trials", "1")
    labels = ["native", "etcd-v3 poll", "c10d", "etcd-v3 poll, backoff 0.05"]
    labels += ["etcd-v2"] if HAVE_V2 else []
    if rendezvous.watch_unavailable() is None:
        labels += ["etcd-v3 watch", "etcd-v3 watch, backoff 0.05"]
    for label in labels:
        assert f"\n| {label} | 2 |" in text, f"no row for {label!r}:\n{text}"
    assert "\n| 2 |" in text  # the time table's row
    _all_stopped(recorded_servers, recorded_workers)
    assert len(recorded_workers) == 2


def test_contention_benchmark_runs(
    tmp_path: Path, recorded_servers: list[EtcdServer], recorded_workers: list[int]
) -> None:
    text = run_topic("contention", tmp_path, "--tasks", "2", "--processes", "2", "--backoffs",
                     "0", "0.02", "--seconds", "0.2", "--rounds", "1")
    for row in ("| etcd-v3 | 2 |", "| etcd-v3, backoff 0.02 | 2 |", "| etcd-v3 shim | 2 |",
                "| etcd-v3 shim, backoff 0.02 | 2 |", "| c10d | 2 |"):
        assert row in text, f"no row {row!r}:\n{text}"
    assert ("| etcd-v2 | 2 |" in text) == HAVE_V2
    _all_stopped(recorded_servers, recorded_workers)


def test_state_scale_benchmark_runs(
    tmp_path: Path, recorded_servers: list[EtcdServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import state_scale

    # Small limits, so that the capacity searches build small states.
    monkeypatch.setattr(state_scale, "GO_FORM_LIMIT", 256 * 1024)
    monkeypatch.setattr(state_scale, "TCPSTORE_PAYLOAD_LIMIT", 128 * 1024)
    text = run_topic("scale", tmp_path, "--sizes", "100", "--repeats", "1", "--tolerance",
                     "200", "--max-request-bytes", str(64 * 1024))
    assert "| etcd-v3 (stored form: header + zlib) |" in text
    assert "| etcd-v2 (base64) |" in text
    assert "| 100 |" in text
    assert "| c10d (base64) |" in text
    assert text.count("written and read back") == (4 if HAVE_V2 else 2), text
    _all_stopped(recorded_servers, [])


def test_join_scale_benchmark_ranks_every_agent_once_within_the_write_bound(
    tmp_path: Path, recorded_servers: list[EtcdServer]
) -> None:
    from benchmarks import join_scale

    text = run_topic("join-scale", tmp_path, "--sizes", "6", "--thread-sizes", "3", "4",
                     "--trials", "1", "--cap", "30", "--connections", "2")
    results = raw_results(tmp_path, "join-scale")
    by_harness = {m.harness: m for m in results.measurements if m.n == 6}
    native = by_harness[join_scale.NATIVE]
    # The topic checks every rank 0..N-1 held once (else it raises); all 6 were ranked.
    assert native.ok and native.done == 6
    # At most two writes per node (join, leave); leaving is one revocation per node; the
    # round's shared writes: its one seal and the run lease's key.
    assert native.round_writes is not None and native.round_writes <= 2
    assert native.leave is not None and native.leave.revisions == 6
    assert (native.seals, native.shared_writes) == (1, 2)
    assert by_harness[join_scale.FLOOR_JOINS].etcd.revisions == 6
    assert by_harness[join_scale.FLOOR_FANOUT].etcd.count("events") >= 6
    assert by_harness[join_scale.RAW_RANKS].etcd.revisions == 0
    for harness in (join_scale.TORCH_V3, join_scale.TORCH_C10D):
        ranked = sorted(m.n for m in results.measurements if m.harness == harness and m.ok)
        assert ranked == [3, 4], (harness, results.measurements)
    assert "| native | 6 | 1.00 + 1.00 | 2 |" in text
    assert "at most 2 etcd writes per node per round (join, leave) plus 1 seal" in text
    _all_stopped(recorded_servers, [])


def test_join_scale_check_refuses_a_rank_held_twice() -> None:
    from benchmarks import join_scale
    from etcd_rdzv import Admission

    join_scale.check_ranks("x", 3, [Admission(1, rank, 3) for rank in (0, 1, 2)])
    with pytest.raises(join_scale.RendezvousError, match="not one rendezvous"):
        join_scale.check_ranks("x", 3, [Admission(1, rank, 3) for rank in (0, 0, 2)])


def test_steady_state_benchmark_native_writes_nothing_torch_one_write_per_heartbeat(
    tmp_path: Path, recorded_servers: list[EtcdServer]
) -> None:
    from benchmarks import steady_state

    text = run_topic("steady", tmp_path, "--nodes", "4", "--seconds", "4",
                     "--keep-alive-interval", "2", "--sample-every", "1", "--writers", "2",
                     "--connections", "2")
    results = raw_results(tmp_path, "steady")
    native, torch = results.case(steady_state.NATIVE), results.case(steady_state.TORCH)
    assert native.revisions == 0
    assert native.points[-1].renewals >= 4  # every node renewed its lease
    assert torch.heartbeats > 0 and torch.revisions == torch.heartbeats
    assert "| no etcd revision while 4 native nodes heartbeat (steady state) |" in text
    assert len(recorded_servers) == 2  # a fresh etcd per handler
    _all_stopped(recorded_servers, [])


def test_history_growth_benchmark_runs(tmp_path: Path) -> None:
    text = run_topic("growth", tmp_path, "--nodes", "10", "--writes", "4")
    rows = [line for line in text.splitlines() if line.startswith("| 10 |")]
    assert len(rows) == 2  # compaction off and on


def test_store_benchmark_runs(
    tmp_path: Path, recorded_servers: list[EtcdServer], recorded_workers: list[int]
) -> None:
    text = run_topic("store", tmp_path, "--rounds", "2", "--batches", "1", "--adders", "2",
                     "--adds", "2")
    assert "| TCPStore | 2 |" in text
    assert "| EtcdStore | 2 |" in text
    assert ("| etcd-v2 EtcdStore | 2 |" in text) == HAVE_V2
    assert "| EtcdStore | 2 x 2 x 1 |" in text
    _all_stopped(recorded_servers, recorded_workers)


def test_runner_writes_the_document(
    tmp_path: Path, recorded_servers: list[EtcdServer], capsys: pytest.CaptureFixture[str]
) -> None:
    output, images, raw = tmp_path / "benchmarks.md", tmp_path / "img", tmp_path / "raw.pickle"
    args = ["--quick", "--only", "calls", "--output", str(output), "--images", str(images),
            "--raw", str(raw)]
    assert run_all.main(args) == 0

    text = output.read_text()
    assert "## Targets" in text
    assert "sync shim within 1.2x of the raw aetcd floor per call" in text
    assert "## 1. Backend calls" in text
    assert "## Machine" in text
    if _plots.unavailable() is None:
        assert (images / "backend_calls.png").is_file()
        assert "](img/backend_calls.png)" in text  # relative to the report
    else:
        assert "No plot: matplotlib is not installed" in text
    output.unlink()
    assert run_all.main([*args, "--render-only"]) == 0  # from the raw results alone
    assert "## 1. Backend calls" in output.read_text()
    assert len(recorded_servers) == 1
    _all_stopped(recorded_servers, [])
    capsys.readouterr()


@pytest.mark.slow
def test_linearizability_soak_runs_and_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import linearizability_soak

    assert linearizability_soak.main(["--seconds", "4", "--clients", "3"]) == 0
    out = capsys.readouterr().out
    assert "violations: 0" in out
    assert "operations checked:" in out


def test_a_bad_option_names_itself_and_its_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run_all.main(["--calls", "0"], topic="calls")
    assert info.value.code == 2
    assert "argument --calls: must be at least 1, got 0" in capsys.readouterr().err


def test_the_template_has_a_block_for_every_topic() -> None:
    assert set(run_all.TOPICS) <= set(run_all.template_blocks())
