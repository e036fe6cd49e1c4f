"""An elastic torchrun training job over etcd v3 that loses a node and gets it back (``make demo``).

The demo starts an embedded etcd (:class:`etcd_rdzv.testing.EtcdServer`) on loopback, then
two torchrun agents ("nodes", 2 workers each) with ``--rdzv-backend=etcd-v3
--nnodes=1:2 --max-restarts=3`` that train ``examples/train.py`` together (gloo, CPU):

1. both nodes meet: one world of 4 workers;
2. once they train, node-b is killed (its torchrun and its workers, SIGKILL): node-a's
   workers fail on their next all_reduce, node-a restarts them, and after node-b's heartbeats
   run out the job goes on alone in a world of 2;
3. node-b is started again: node-a sees a node waiting, restarts its workers, and both meet
   in a world of 4 again and finish the training.

It prints the rounds, the world size of each, how long each node's rendezvous took (from
torch's handler log) and the total time; it exits non-zero unless the job went 4 → 2 → 4
workers and finished. Everything it started is stopped in ``finally``.

The helpers (:class:`TorchrunNode`, :func:`torchrun_command`, :func:`wait_for`) are reused
by ``tests/test_torchrun_e2e.py``. Linux only: killing a node walks ``/proc``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

__all__ = [
    "LOCAL_ADDR",
    "TRAIN_SCRIPT",
    "DemoError",
    "RendezvousRecord",
    "TorchrunNode",
    "WorkerLine",
    "main",
    "run_demo",
    "torchrun_command",
    "torchrun_env",
    "wait_for",
]

#: Every agent, worker and store stays on loopback.
LOCAL_ADDR = "127.0.0.1"
TRAIN_SCRIPT = Path(__file__).resolve().with_name("train.py")
#: torch's handler logs each join at INFO through this logger; TORCH_LOGS turns it on.
HANDLER_LOGGER = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

_WORKER_LINE = re.compile(
    r"\b(STARTED|WAITING|RESULT) rank=(\d+) world=(\d+) local=(-?\d+) group=(-?\d+) "
    r"restart=(\d+)((?: \w+=[^\s=]+)*)"
)
_FIELD = re.compile(r"(\w+)=([^\s=]+)")
_JOIN_ATTEMPT = re.compile(r"The node '([^']+)' attempts to join the next round")
_JOINED = re.compile(
    r"The node '([^']+)' has joined round (\d+) of the rendezvous '[^']*' as rank (\d+) "
    r"in a world of size (\d+)"
)
_WORLD_SIZES = re.compile(r"global_world_sizes=\[(\d+)")
_TAIL_CHARS = 3000


class DemoError(RuntimeError):
    """The job did not do what was expected; the message carries the nodes' output tails."""


@dataclass(frozen=True)
class WorkerLine:
    """One ``STARTED``/``WAITING``/``RESULT`` line printed by a worker of ``train.py``."""

    node: str
    kind: str
    rank: int
    world: int
    local: int
    group: int
    restart: int
    fields: Mapping[str, str]
    at: float
    """``time.monotonic()`` when the line was read."""

    def int_field(self, name: str) -> int:
        return int(self.fields[name])


@dataclass
class RendezvousRecord:
    """One rendezvous of one node, from torch's handler log: a round it joined."""

    node: str
    round: int
    node_rank: int
    nodes: int
    """The world size in nodes (agents)."""
    started: float
    """``time.monotonic()`` when the node began to (re)join; see :attr:`seconds`."""
    joined: float
    workers: int | None = None
    """The world size in workers, from the agent's log (None if it was not seen)."""

    @property
    def seconds(self) -> float:
        """How long ``next_rendezvous()`` took (log lines timed as they were read)."""
        return self.joined - self.started


def torchrun_executable() -> list[str]:
    """``torchrun`` beside this interpreter, else ``python -m torch.distributed.run``."""
    sibling = Path(sys.executable).parent / "torchrun"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    return [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(
    endpoint: str,
    run_id: str,
    *,
    nnodes: str = "1:2",
    nproc_per_node: int = 2,
    max_restarts: int = 3,
    rdzv_conf: Mapping[str, object] | str | None = None,
    script: str | os.PathLike[str] = TRAIN_SCRIPT,
    script_args: Sequence[str] = (),
) -> list[str]:
    """The command line of one torchrun node of an etcd-v3 job, kept on loopback.

    ``rdzv_conf`` is ``--rdzv-conf``: options as a mapping, or the ``k=v,k=v`` text itself.
    """
    command = [
        *torchrun_executable(),
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=etcd-v3",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        f"--max-restarts={max_restarts}",
        f"--local-addr={LOCAL_ADDR}",
        "--monitor-interval=0.2",
    ]
    if isinstance(rdzv_conf, str):
        command.append(f"--rdzv-conf={rdzv_conf}")
    elif rdzv_conf:
        command.append("--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in rdzv_conf.items()))
    return [*command, str(script), *script_args]


def torchrun_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a torchrun node: gloo on loopback, the agent's and handler's logs,
    no TCPStore sharing between agent and workers (see the comment inside)."""
    env = dict(os.environ)
    env.update({
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "LOGLEVEL": "INFO",  # torch.distributed.elastic's agent logs
        # torch's default since 2.4 shares the rank-0 agent's TCPStore with the workers and
        # publishes its address once: a node that joins a later round waits for MASTER_ADDR
        # of that round forever, and restarted workers can hang (pytorch/pytorch#135712).
        # With sharing off, rank 0 publishes a fresh address every round.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    })
    env.setdefault("TORCH_LOGS", HANDLER_LOGGER)  # "joined round R ... world of size N"
    env.update(extra or {})
    return env


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: split after its last ")".
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from ``/proc``."""
    children = _children_by_parent()
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _is_worker(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line mentions ``marker``."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


class TorchrunNode:
    """One torchrun agent and its workers: a "node" of the job, on this host.

    torchrun runs in a session of its own; its output (agent logs, worker lines, both
    streams) is read by a thread. torchrun starts each worker in a session of its own too,
    so :meth:`kill` stops the agent first, then kills every descendant and the agent.

    Args:
        name: what messages call this node (``node-a``).
        command: the torchrun command line (:func:`torchrun_command`).
        env: the environment; :func:`torchrun_env` if None.
    """

    def __init__(self, name: str, command: Sequence[str],
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.env = dict(env) if env is not None else torchrun_env()
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._marker = str(command[-1]) if command else ""
        for arg in command:  # the script is the first argument ending in .py
            if arg.endswith(".py"):
                self._marker = arg
                break

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        assert self.process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout,),
                                        name=f"torchrun-{self.name}", daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self._lines.append((time.monotonic(), line))
        stream.close()

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        """torchrun's exit code, once it and its output are done.

        Raises:
            subprocess.TimeoutExpired: it still runs after ``timeout`` s.
        """
        assert self.process is not None
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(5.0)  # workers still holding the pipe do not block this long
        return code

    def kill(self) -> None:
        """Kill the node at once: torchrun (frozen first, so it starts nothing more), then
        every descendant, each in its own process group, then torchrun's group (SIGKILL)."""
        process = self.process
        if process is None:
            return
        pgid = process.pid  # start_new_session: torchrun leads its group
        alive = process.poll() is None
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGSTOP)
            victims = _descendants(process.pid)
        else:
            victims = []
        # Workers whose torchrun is gone were re-parented: find them by the pids they printed.
        victims += [pid for pid in self.worker_pids() if _is_worker(pid, self._marker)]
        for pid in dict.fromkeys(victims):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                group = os.getpgid(pid)
                if group not in (os.getpgrp(), 0, 1):
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
        if alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        process.wait()

    def close(self) -> None:
        """Kill what is left of the node and stop reading its output."""
        self.kill()
        if self._reader is not None:
            self._reader.join(5.0)
        if self.process is not None and self.process.stdout is not None:
            with contextlib.suppress(OSError):
                self.process.stdout.close()

    # What the node printed.

    def lines(self) -> list[tuple[float, str]]:
        """Every output line so far, with ``time.monotonic()`` when it was read."""
        with self._lock:
            return list(self._lines)

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines())

    def tail(self, chars: int = _TAIL_CHARS) -> str:
        return self.output()[-chars:]

    def worker_lines(self, kind: str | None = None) -> list[WorkerLine]:
        """The workers' ``STARTED``/``WAITING``/``RESULT`` lines (one kind, or all)."""
        found: list[WorkerLine] = []
        for at, line in self.lines():
            for match in _WORKER_LINE.finditer(line):
                if kind is not None and match.group(1) != kind:
                    continue
                fields = dict(_FIELD.findall(match.group(7)))
                found.append(WorkerLine(
                    node=self.name, kind=match.group(1), rank=int(match.group(2)),
                    world=int(match.group(3)), local=int(match.group(4)),
                    group=int(match.group(5)), restart=int(match.group(6)), fields=fields,
                    at=at,
                ))
        return found

    def worker_pids(self) -> list[int]:
        pids = {line.int_field("pid") for line in self.worker_lines("STARTED")
                if "pid" in line.fields}
        return sorted(pids)

    def rendezvous(self) -> list[RendezvousRecord]:
        """The rounds this node joined, from torch's handler log (needs ``TORCH_LOGS``)."""
        records: list[RendezvousRecord] = []
        attempt: float | None = None
        for at, line in self.lines():
            if _JOIN_ATTEMPT.search(line):
                attempt = at
            elif match := _JOINED.search(line):
                records.append(RendezvousRecord(
                    node=self.name, round=int(match.group(2)), node_rank=int(match.group(3)),
                    nodes=int(match.group(4)),
                    started=attempt if attempt is not None else self.started_at, joined=at,
                ))
                attempt = None
            elif (match := _WORLD_SIZES.search(line)) and records \
                    and records[-1].workers is None:
                records[-1].workers = int(match.group(1))
        return records


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    nodes: Iterable[TorchrunNode] = (),
    *,
    must_run: Iterable[TorchrunNode] = (),
) -> None:
    """Return once ``condition()`` holds; poll every 0.1 s.

    Raises:
        DemoError: ``timeout`` s passed, or a node of ``must_run`` exited, first; the message
            names ``what`` and carries the output tails of ``nodes``.
    """
    nodes, must_run = list(nodes), list(must_run)
    deadline = time.monotonic() + timeout
    while not condition():
        stopped = [node for node in must_run if not node.running]
        if stopped or time.monotonic() > deadline:
            reason = f"{stopped[0].name} exited with code {stopped[0].returncode}" if stopped \
                else f"not within {timeout:g} s"
            raise DemoError(f"Waiting for {what}: {reason}.\n" + describe(nodes))
        time.sleep(0.1)


def describe(nodes: Iterable[TorchrunNode]) -> str:
    """Each node's exit code and output tail, for error messages."""
    return "\n".join(
        f"--- {node.name} (pid {node.pid}, exit code {node.returncode}):\n{node.tail()}"
        for node in nodes
    )


def _has_started(node: TorchrunNode, world: int, count: int, since: float = 0.0) -> bool:
    """True once ``count`` workers of ``node`` printed STARTED in a world of ``world``."""
    return sum(1 for line in node.worker_lines("STARTED")
               if line.world == world and line.at >= since) >= count


@dataclass
class DemoSummary:
    """What :func:`run_demo` saw."""

    endpoint: str
    run_id: str
    nodes: list[TorchrunNode]
    events: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def records(self) -> list[RendezvousRecord]:
        return sorted((record for node in self.nodes for record in node.rendezvous()),
                      key=lambda record: (record.round, record.joined))

    def rounds(self) -> dict[int, list[RendezvousRecord]]:
        by_round: dict[int, list[RendezvousRecord]] = {}
        for record in self.records:
            by_round.setdefault(record.round, []).append(record)
        return by_round

    def world_sizes(self, nproc_per_node: int) -> list[int]:
        """The world size in workers of each round, in round order."""
        return [
            next((r.workers for r in records if r.workers is not None),
                 records[0].nodes * nproc_per_node)
            for _, records in sorted(self.rounds().items())
        ]


def run_demo(
    endpoint: str,
    *,
    steps: int = 20,
    sleep: float = 0.3,
    nproc_per_node: int = 2,
    timeout: float = 120.0,
    extra_conf: Mapping[str, object] | None = None,
    say: Callable[[str], None] = print,
) -> DemoSummary:
    """Run the two-node job against etcd at ``endpoint``: kill node-b mid-run, bring it back.

    ``steps`` times ``sleep`` is how long a full world trains; ``extra_conf`` adds or replaces
    ``--rdzv-conf`` options (``key_prefix``, ...); ``say`` gets each progress line.

    Raises:
        DemoError: a step did not happen within ``timeout`` s or the job failed; no process
            is left behind either way.
    """
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    conf: dict[str, object] = {
        "join_timeout": 120,
        "last_call_timeout": 3,      # a node alone waits this long for others
        "close_timeout": 30,
        "keep_alive_interval": 1,    # heartbeats every second...
        "keep_alive_max_attempt": 3,  # ...and a silent node is dropped after 3 s
        "read_timeout": 30,
        **(extra_conf or {}),
    }
    command = torchrun_command(
        endpoint, run_id, nnodes="1:2", nproc_per_node=nproc_per_node, max_restarts=3,
        rdzv_conf=conf,
        script_args=["--steps", str(steps), "--sleep", str(sleep),
                     "--min-world", str(2 * nproc_per_node), "--min-world-timeout", "60"],
    )
    summary = DemoSummary(endpoint, run_id, [])
    summary.started = time.monotonic()

    def event(text: str) -> None:
        now = time.monotonic()
        summary.events.append((now, text))
        say(f"[{now - summary.started:5.1f} s] {text}")

    full = 2 * nproc_per_node
    node_a = TorchrunNode("node-a", command)
    node_b = TorchrunNode("node-b", command)
    summary.nodes += [node_a, node_b]
    try:
        say(f"run {run_id!r}: 2 torchrun nodes x {nproc_per_node} workers, "
            f"--nnodes=1:2 --max-restarts=3 --rdzv-backend=etcd-v3 --rdzv-endpoint={endpoint}")
        # Paths relative to the project, so the output reads the same on every machine.
        say("  " + " ".join(command[len(torchrun_executable()):])
            .replace(str(TRAIN_SCRIPT), str(TRAIN_SCRIPT.relative_to(TRAIN_SCRIPT.parents[1]))))
        node_a.start()
        node_b.start()
        event(f"started node-a (pid {node_a.pid}) and node-b (pid {node_b.pid})")
        nodes = [node_a, node_b]
        wait_for(lambda: all(_has_started(n, full, nproc_per_node) for n in nodes), timeout,
                 f"both nodes to train in a world of {full}", nodes, must_run=nodes)
        event(f"both nodes train in a world of {full}")
        time.sleep(2.0)  # a few steps
        node_b.kill()
        killed = time.monotonic()
        event(f"killed node-b: torchrun and its {nproc_per_node} workers, SIGKILL")
        wait_for(lambda: _has_started(node_a, nproc_per_node, nproc_per_node, killed), timeout,
                 f"node-a to go on alone in a world of {nproc_per_node}", nodes,
                 must_run=[node_a])
        event(f"node-a trains alone in a world of {nproc_per_node} "
              f"(restart {max(line.restart for line in node_a.worker_lines('STARTED'))})")
        node_b2 = TorchrunNode("node-b'", command)
        summary.nodes.append(node_b2)
        node_b2.start()
        back = time.monotonic()
        event(f"started node-b again as node-b' (pid {node_b2.pid})")
        nodes = [node_a, node_b2]
        wait_for(lambda: all(_has_started(n, full, nproc_per_node, back) for n in nodes),
                 timeout, f"both nodes to train in a world of {full} again", summary.nodes,
                 must_run=nodes)
        event(f"both nodes train in a world of {full} again")
        codes = {}
        for node in nodes:
            try:
                codes[node.name] = node.wait(timeout)
            except subprocess.TimeoutExpired:
                raise DemoError(f"{node.name} did not finish within {timeout:g} s.\n"
                                + describe(summary.nodes)) from None
        event("both nodes finished: exit codes " + ", ".join(
            f"{name} {code}" for name, code in codes.items()))
        if any(codes.values()):
            raise DemoError("The job failed.\n" + describe(summary.nodes))
    finally:
        for node in summary.nodes:
            node.close()
        summary.finished = time.monotonic()
    return summary


def _report(summary: DemoSummary, nproc_per_node: int) -> list[str]:
    """Print the summary; return the problems found."""
    rounds = summary.rounds()
    print(f"{'round':>5}  {'nodes':>5}  {'world':>5}  rendezvous time per node (from "
          "'attempts to join' to 'joined' in torch's handler log)")
    for number, records in sorted(rounds.items()):
        workers = next((r.workers for r in records if r.workers is not None),
                       records[0].nodes * nproc_per_node)
        times = ", ".join(f"{r.node} {r.seconds:.1f} s" for r in records)
        print(f"{number:>5}  {records[0].nodes:>5}  {workers:>5}  {times}")
    results = [line for node in summary.nodes for line in node.worker_lines("RESULT")]
    for line in sorted(results, key=lambda line: line.rank):
        print(f"  {line.node:<7} rank {line.rank} of {line.world}: all_reduce sum "
              f"{line.fields.get('sum')} (expected {line.fields.get('expected')}), restart "
              f"{line.restart}, replicas in sync {line.fields.get('in_sync') == '1'}, "
              f"loss {line.fields.get('loss')}")
    sizes = summary.world_sizes(nproc_per_node)
    full = 2 * nproc_per_node
    problems: list[str] = []
    if len(sizes) < 3 or sizes[-1] != full or nproc_per_node not in sizes[1:-1]:
        problems.append(f"world sizes per round are {sizes}: expected {full} -> "
                        f"{nproc_per_node} -> {full}")
    if len(results) != full or any(line.world != full or line.fields.get("sum")
                                   != line.fields.get("expected") for line in results):
        problems.append(f"expected {full} RESULT lines in a world of {full} with the right "
                        f"sum, got {[(r.node, r.rank, r.world) for r in results]}")
    print(f"rounds {' -> '.join(str(n) for n in sorted(rounds))}, world sizes "
          f"{' -> '.join(map(str, sizes))}; total wall time "
          f"{summary.finished - summary.started:.1f} s (etcd start not included)")
    return problems


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # so that the finally clauses stop torchrun and etcd


def main(argv: Sequence[str] | None = None) -> int:
    from etcd_rdzv.testing import EtcdServer

    parser = argparse.ArgumentParser(description="A 2-node torchrun job over etcd-v3: one "
                                     "node is killed and comes back.")
    parser.add_argument("--handler", choices=("torch", "native", "both"), default="both",
                        help="the rendezvous handler (--rdzv-conf handler=...); 'both' runs "
                        "the job once with each (default)")
    handlers = ["torch", "native"] if (args := parser.parse_args(argv)).handler == "both" \
        else [args.handler]
    nproc_per_node = 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    server = EtcdServer()
    problems: list[str] = []
    try:
        server.start()
        print(f"etcd is serving on {server.get_endpoint()} "
              f"({time.monotonic() - started:.1f} s)", flush=True)
        for handler in handlers:
            print(f"\n=== handler={handler} ===", flush=True)
            try:
                summary = run_demo(server.get_endpoint(), nproc_per_node=nproc_per_node,
                                   extra_conf={"handler": handler},
                                   say=lambda text: print(text, flush=True))
            except DemoError as exc:
                print(f"FAILED: {exc}", file=sys.stderr)
                return 1
            problems += [f"handler={handler}: {problem}"
                         for problem in _report(summary, nproc_per_node)]
    finally:
        server.stop()
    print(f"total with etcd start and stop: {time.monotonic() - started:.1f} s")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"OK ({', '.join(f'handler={h}' for h in handlers)}): node-b left and came back; "
          "the job shrank to 2 workers, grew back to 4 and finished")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
