"""The etcd-rdzv command, run as a user runs it: the installed console script in a subprocess,
against real etcd servers (plain, TLS, with auth). Every expected failure is one line on
stderr with the exit code docs/cli.md gives it."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import pytest_asyncio

import etcd_rdzv
from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    AsyncEtcdStore,
    Deadline,
    EtcdClient,
    EtcdConfig,
    RendezvousAdmin,
    RunClosedError,
)
from etcd_rdzv.cli import (
    EXIT_AUTH,
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_NOT_TORCH_STATE,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    parse_duration,
)
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.native import NodeId
from etcd_rdzv.testing import EtcdServer, TlsCertificates, free_port, make_certificates
from etcd_rdzv.testing.states import torch_state

from .test_admin_native import status_when
from .test_native import Nodes, join_all

COMMANDS = ["serve", "status", "list", "watch", "close", "delete", "cleanup"]
#: The variables the command reads; a test sets them explicitly or not at all.
CLI_ENV_VARS = ("ETCD_RDZV_ENDPOINTS", "ETCD_RDZV_PASSWORD")


def etcd_rdzv_executable() -> str:
    script = Path(sys.executable).parent / "etcd-rdzv"
    assert script.exists(), f"{script} is missing: the etcd-rdzv console script is not " \
        "installed (pip install -e .)"
    return str(script)


def cli_env(**variables: str) -> dict[str, str]:
    base = {name: value for name, value in os.environ.items() if name not in CLI_ENV_VARS}
    return {**base, **variables}


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def failed_with(self, code: int) -> str:
        """Check the exit code and that stderr is one line and no traceback; the line."""
        assert self.code == code, (self.code, self.out, self.err)
        assert "Traceback" not in self.err, self.err
        assert self.err.count("\n") == 1 and self.err.startswith("etcd-rdzv"), self.err
        return self.err.strip()


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    """``etcd-rdzv ARGV`` in a subprocess; its exit code, stdout and stderr."""
    done = subprocess.run([etcd_rdzv_executable(), *argv], capture_output=True, text=True,
                          timeout=timeout, env=env if env is not None else cli_env())
    return Result(done.returncode, done.stdout, done.stderr)


def start(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([etcd_rdzv_executable(), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=env if env is not None else cli_env())


def seed(endpoint: str, key_prefix: str, run_id: str, nodes: int = 3, store_keys: int = 1,
         config: dict[str, Any] | None = None, ttl: int = 600,
         state: bytes | None = None) -> None:
    """Write a torch state (or ``state``) and store keys for ``run_id``, as an agent would."""
    async def write() -> None:
        cfg = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=10, **(config or {}))
        async with EtcdClient(cfg) as client:
            backend = AsyncEtcdRendezvousBackend(client, run_id, key_prefix=key_prefix, ttl=ttl)
            written = await backend.set_state(torch_state(nodes) if state is None else state)
            assert written is not None and written[2]
            store = AsyncEtcdStore(client, RunKeys(run_id, key_prefix).store_prefix,
                                   backend.lease)
            for index in range(store_keys):
                await store.set(f"k{index}", "v")

    asyncio.run(write())


class Cli:
    """``etcd-rdzv`` with the test server's endpoint and the test's key prefix."""

    def __init__(self, endpoint: str, key_prefix: str):
        self.endpoint, self.key_prefix = endpoint, key_prefix

    def __call__(self, *argv: str) -> Result:
        return run(*argv, "--endpoints", self.endpoint, "--key-prefix", self.key_prefix)


@pytest.fixture
def cli(etcd_server: EtcdServer, key_prefix: str) -> Cli:
    return Cli(etcd_server.get_endpoint(), key_prefix)


def run_id() -> str:
    return f"job-{uuid.uuid4().hex[:6]}"


class Lines:
    """A process's stdout or stderr, line by line, each read with a timeout."""

    def __init__(self, process: subprocess.Popen[str], stream: IO[str] | None) -> None:
        assert stream is not None
        self._process, self._lines = process, queue.Queue[str]()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put("")

    def next(self, timeout: float = 30.0) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output within {timeout} s") from None
        assert line, f"the process ended (exit code {self._process.poll()})"
        return line

    def rest(self) -> str:
        """What is left, once the process has ended."""
        lines = []
        while (line := self._lines.get(timeout=30)) != "":
            lines.append(line)
        return "".join(lines)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts, ended after it if still running: SIGTERM first, so that a
    served etcd is stopped with its command rather than left behind."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the commands ----------------------------------------------------------------------------

def test_status_prints_a_readable_table(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run, nodes=3)
    result = cli("status", run)
    assert (result.code, result.err) == (EXIT_OK, "")
    out = result.out
    assert re.search(r"^handler\s+torch$", out, re.M)
    assert re.search(r"^round\s+7$", out, re.M)
    assert re.search(r"^state\s+complete$", out, re.M)
    assert re.search(r"^nodes\s+3 participants, 0 waiting, 0 redundant$", out, re.M)
    assert f"{cli.key_prefix}/{run} (revision " in out
    assert re.search(r"^NODE\s+ROLE\s+RANK\s+LAST HEARTBEAT$", out, re.M)
    for rank in range(3):
        assert re.search(rf"^node-{rank:06d}\.cluster\.example\.com_{10000 + rank}_0\s+"
                         rf"participant\s+{rank}\s+[\d.]+ s ago$", out, re.M)


def test_status_json(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run, nodes=2)
    result = cli("status", run, "--json")
    assert result.code == EXIT_OK
    data = json.loads(result.out)
    assert data["run_id"] == run and data["key"] == f"{cli.key_prefix}/{run}"
    assert data["handler"] == "torch"
    assert data["state"]["world_size"] == 2 and data["state"]["closed"] is False
    assert [node["rank"] for node in data["state"]["nodes"]] == [0, 1]


def test_status_of_a_missing_run_exits_3(cli: Cli) -> None:
    result = cli("status", "nope")
    assert result.out == ""
    assert result.failed_with(EXIT_NOT_FOUND).startswith(
        "etcd-rdzv: No rendezvous state and no native keys for run 'nope'")


def test_list(cli: Cli) -> None:
    result = cli("list")
    assert result.code == EXIT_OK and "No runs under" in result.out
    seed(cli.endpoint, cli.key_prefix, "first", nodes=2, store_keys=2)
    seed(cli.endpoint, cli.key_prefix, "second", nodes=1, store_keys=0)
    result = cli("list")
    lines = result.out.splitlines()
    assert result.code == EXIT_OK
    assert re.split(r"\s{2,}", lines[0]) == ["RUN", "HANDLER", "ROUND", "STATE", "NODES",
                                             "ALIVE", "REVISION", "SIZE", "STORE KEYS",
                                             "IDLE AT LEAST", "EXPIRES IN"]
    assert lines[1].split()[:6] == ["first", "torch", "7", "complete", "2", "-"]
    assert lines[2].split()[:6] == ["second", "torch", "7", "complete", "1", "-"]
    result = cli("list", "--json")
    assert [(run["run_id"], run["store_keys"]) for run in json.loads(result.out)] == \
        [("first", 2), ("second", 0)]


def test_a_state_another_program_wrote_is_not_a_torch_state(cli: Cli) -> None:
    """The README's snippet stores b"hello" as a state: not torch's, so exit 6, not corrupt."""
    seed(cli.endpoint, cli.key_prefix, "hello", state=b"hello", store_keys=0)
    message = cli("status", "hello").failed_with(EXIT_NOT_TORCH_STATE)
    assert "is not a torch rendezvous state (5 bytes)" in message
    assert "corrupt" not in message
    assert cli("close", "hello").failed_with(EXIT_NOT_TORCH_STATE) == message

    result = cli("list")
    assert result.code == EXIT_OK
    assert re.search(r"^hello\s+torch\s+-\s+not torch\s+-\s+-\s+\d+\s+19 B\s", result.out,
                     re.M)
    assert "not a torch rendezvous state" in result.err
    [run] = json.loads(cli("list", "--json").out)
    assert run["not_a_torch_state"] is True and run["world_size"] is None


def test_a_corrupt_state_is_called_corrupt(cli: Cli) -> None:
    async def put_without_header() -> None:
        cfg = EtcdConfig(endpoints=parse_endpoints(cli.endpoint), read_timeout=10)
        async with EtcdClient(cfg) as client:
            await client.put(RunKeys("broken", cli.key_prefix).state, b"ERDZ", 0,
                             Deadline.after(10))

    asyncio.run(put_without_header())
    message = cli("status", "broken").failed_with(EXIT_ERROR)
    assert "is corrupt" in message and "not a torch" not in message
    result = cli("list")
    assert re.search(r"^broken\s+torch\s+-\s+unreadable\s", result.out, re.M)
    assert not json.loads(cli("list", "--json").out)[0]["not_a_torch_state"]


def test_close_then_status_shows_closed(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run)
    result = cli("close", run, "--ttl", "60")
    assert result.code == EXIT_OK and result.out.startswith(f"Closed run {run!r}")
    result = cli("close", run)
    assert result.code == EXIT_OK and "already closed" in result.out
    assert re.search(r"^state\s+closed$", cli("status", run).out, re.M)
    assert "nothing to close" in cli("close", "nope").failed_with(EXIT_NOT_FOUND)


def test_delete(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run, store_keys=2)
    result = cli("delete", run)
    assert (result.code, result.out.strip()) == (EXIT_OK, f"Deleted run {run!r}: 3 keys.")
    assert "has no keys" in cli("delete", run).failed_with(EXIT_NOT_FOUND)


def test_cleanup_deletes_only_runs_idle_long_enough(cli: Cli) -> None:
    # The idle time comes from the lease of the run's newest key, less one lease window (a
    # lease serves writes for ttl/10 s): a short ttl makes the window 1 s.
    seed(cli.endpoint, cli.key_prefix, "old", ttl=10)
    time.sleep(4)
    seed(cli.endpoint, cli.key_prefix, "new", ttl=10)

    result = cli("cleanup")  # default: idle for an hour
    assert result.code == EXIT_OK and "No run idle for 60 min or more (2 runs)" in result.out
    result = cli("cleanup", "--older-than", "1s", "--dry-run")
    assert result.code == EXIT_OK
    assert "Would delete 1 of 2 runs" in result.out and "  old  (2 keys, idle" in result.out
    assert "new" not in result.out
    result = cli("cleanup", "--older-than", "1s")
    assert result.code == EXIT_OK
    assert "Listing the runs" in result.err
    assert re.search(r"^\[1/1\] deleted old \(2 keys, idle [\d.]+ s\)$", result.out, re.M)
    assert "Deleted 1 run (2 keys)" in result.out
    assert [line.split()[0] for line in cli("list").out.splitlines()[1:]] == ["new"]


def test_as_a_module(etcd_server: EtcdServer, key_prefix: str) -> None:
    run = run_id()
    seed(etcd_server.get_endpoint(), key_prefix, run, nodes=2)
    result = subprocess.run(
        [sys.executable, "-m", "etcd_rdzv.cli", "status", run, "--endpoints",
         etcd_server.get_endpoint(), "--key-prefix", key_prefix],
        capture_output=True, text=True, timeout=60, env=cli_env())
    assert result.returncode == EXIT_OK, result.stderr
    assert "2 participants" in result.stdout


# --- native runs (handler=native) ---------------------------------------------------------------

@pytest_asyncio.fixture
async def native_nodes(etcd_config: EtcdConfig, key_prefix: str) -> AsyncIterator[Nodes]:
    """Native nodes of a fresh run under the test's key prefix, all left at the end."""
    made = Nodes(etcd_config, RunKeys(run_id(), key_prefix))
    yield made
    await made.close()


async def test_status_of_a_native_run(cli: Cli, native_nodes: Nodes,
                                      etcd_client: EtcdClient) -> None:
    run_ = native_nodes.keys.run_id
    members = [native_nodes.add(NodeId("m", 1, rank), min_nodes=2, max_nodes=2)
               for rank in range(2)]
    await join_all(members)
    standby = native_nodes.add(NodeId("s", 1, 0), min_nodes=2, max_nodes=2)
    joining = asyncio.create_task(standby.next_rendezvous())
    await status_when(RendezvousAdmin(etcd_client, cli.key_prefix), run_,
                      {"m_1_0": "member", "m_1_1": "member", "s_1_0": "standby"})

    result = await asyncio.to_thread(cli, "status", run_)
    assert (result.code, result.err) == (EXIT_OK, "")
    out = result.out
    assert re.search(r"^handler\s+native$", out, re.M)
    assert re.search(rf"^keys\s+{re.escape(cli.key_prefix)}/{run_}/native/ \(revision \d+\)$",
                     out, re.M)
    assert re.search(r"^round\s+1 \(2 nodes\), sealed \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
                     r"\([\d.]+ s ago\) by m_1_[01], \d+\.\d{3} s after its first node joined$",
                     out, re.M)
    assert re.search(r"^state\s+complete$", out, re.M)
    assert re.search(r"^nodes\s+2 members, 0 waiting, 1 standby$", out, re.M)
    assert re.search(r"^run lease\s+[0-9a-f]+, \d+ min left \(renewed by the nodes", out, re.M)
    assert re.search(r"^NODE\s+ROLE\s+ROUND\s+RANK\s+JOINED\s+LEASE LEFT$", out, re.M)
    joined = r"\d\d:\d\d:\d\d\.\d{3}"
    for rank in range(2):
        assert re.search(rf"^m_1_{rank}\s+member\s+1\s+{rank}\s+{joined}\s+\d+ s$", out, re.M)
    assert re.search(rf"^s_1_0\s+standby\s+2\s+-\s+{joined}\s+\d+ s$", out, re.M)

    result = await asyncio.to_thread(cli, "status", run_, "--json")
    data = json.loads(result.out)
    assert (data["handler"], data["key"]) == ("native", f"{cli.key_prefix}/{run_}/native/")
    native = data["native"]
    assert (native["round"], native["world_size"], native["state"]) == (1, 2, "complete")
    assert [(node["node"], node["role"], node["rank"]) for node in native["nodes"]] == \
        [("m_1_0", "member", 0), ("m_1_1", "member", 1), ("s_1_0", "standby", None)]
    assert all(node["joined_at"] <= native["sealed_at"] for node in native["nodes"][:2])
    joining.cancel()


async def test_list_and_cleanup_native_runs(cli: Cli, etcd_config: EtcdConfig) -> None:
    """A native run is not idle while a node holds its lease, though a training job writes
    nothing; once its last node left, cleanup deletes it like any idle run."""
    # The run lease lives ttl s and the nodes renew it every ttl/10 s: with ttl=10, a run
    # whose nodes left is idle for 1 s at least after 3 s, and its keys live 10 s.
    live = Nodes(etcd_config, RunKeys("live", cli.key_prefix))
    dead = Nodes(etcd_config, RunKeys("dead", cli.key_prefix))
    try:
        await join_all([live.add(min_nodes=2, max_nodes=2, ttl=10) for _ in range(2)])
        await join_all([dead.add(min_nodes=1, max_nodes=1, ttl=10)])
        await dead.close()

        result = await asyncio.to_thread(cli, "list")
        assert result.code == EXIT_OK
        rows = {line.split()[0]: line.split() for line in result.out.splitlines()[1:]}
        assert rows["live"][:9] == ["live", "native", "1", "complete", "2", "2", "-", "-", "0"]
        idle, _, expires, unit = rows["live"][9:]
        assert idle == "0.0" and 0 < float(expires) <= 10 and unit == "s"
        assert rows["dead"][:6] == ["dead", "native", "1", "no", "nodes", "1"]
        listed = {run["run_id"]: run for run in json.loads(
            (await asyncio.to_thread(cli, "list", "--json")).out)}
        assert (listed["live"]["handler"], listed["live"]["nodes_alive"]) == ("native", 2)
        assert (listed["dead"]["nodes_alive"], listed["dead"]["world_size"]) == (0, 1)

        await asyncio.sleep(4)
        result = await asyncio.to_thread(cli, "cleanup", "--older-than", "1s")
        assert result.code == EXIT_OK
        assert re.search(r"^\[1/1\] deleted dead \(\d+ keys, idle [\d.]+ s\)$", result.out,
                         re.M), result.out
        listing = (await asyncio.to_thread(cli, "list")).out
        assert [line.split()[0] for line in listing.splitlines()[1:]] == ["live"]
    finally:
        await live.close()
        await dead.close()


async def test_close_a_native_run(cli: Cli, native_nodes: Nodes) -> None:
    run_ = native_nodes.keys.run_id
    member = native_nodes.add(min_nodes=1, max_nodes=1)
    await member.next_rendezvous()
    waiting = native_nodes.add(min_nodes=2, max_nodes=2)
    joining = asyncio.create_task(waiting.next_rendezvous())

    result = await asyncio.to_thread(cli, "close", run_)
    assert result.code == EXIT_OK and result.out.startswith(f"Closed run {run_!r}")
    with pytest.raises(RunClosedError):
        await asyncio.wait_for(joining, 10)
    assert await member.is_closed()
    result = await asyncio.to_thread(cli, "close", run_)
    assert result.code == EXIT_OK and "already closed" in result.out
    status = await asyncio.to_thread(cli, "status", run_)
    assert re.search(r"^state\s+closed \(by operator\)$", status.out, re.M)


async def test_watch_a_native_run(cli: Cli, native_nodes: Nodes,
                                  processes: list[subprocess.Popen[str]]) -> None:
    run_ = native_nodes.keys.run_id
    process = start("watch", run_, "--endpoints", cli.endpoint, "--key-prefix", cli.key_prefix)
    processes.append(process)
    lines = Lines(process, process.stdout)

    def line() -> Awaitable[str]:
        return asyncio.to_thread(lines.next)

    stamp = r"^\d\d:\d\d:\d\d  revision \d+  "
    assert re.match(stamp + r"no state \(not created yet, or deleted\)$", await line())
    first = native_nodes.add(NodeId("a", 1, 0), min_nodes=2, max_nodes=2)
    first_joins = asyncio.create_task(first.next_rendezvous())
    assert re.match(stamp + r"round -  joining  0 members, 0 waiting, 0 standbys, 1 joining$",
                    await line())
    second = native_nodes.add(NodeId("b", 1, 0), min_nodes=2, max_nodes=2)
    await asyncio.gather(first_joins, second.next_rendezvous())
    assert re.match(stamp + r"round -  joining  0 members, 0 waiting, 0 standbys, 2 joining  "
                    r"\(b_1_0 joined round 1\)$", await line())
    assert re.match(stamp + r"round 1  complete  2 members, 0 waiting, 0 standbys  \(round 1 "
                    r"sealed with 2 nodes by [ab]_1_0, \d+\.\d{3} s after its first join\)$",
                    await line())
    await second.leave()
    assert re.match(stamp + r"round 1  complete  1 member, 0 waiting, 0 standbys, 1 gone  "
                    r"\(b_1_0 left round 1\)$", await line())
    assert (await asyncio.to_thread(cli, "close", run_)).code == EXIT_OK
    assert re.match(stamp + r"round 1  closed  1 member, 0 waiting, 0 standbys, 1 gone  "
                    r"\(closed by operator\)$", await line())
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == EXIT_OK
    assert process.stderr is not None and process.stderr.read() == ""


async def test_watch_a_native_run_as_json(cli: Cli, native_nodes: Nodes,
                                          processes: list[subprocess.Popen[str]]) -> None:
    run_ = native_nodes.keys.run_id
    group = [native_nodes.add(NodeId("n", 1, index), min_nodes=2, max_nodes=2)
             for index in range(2)]
    await join_all(group)
    process = start("watch", run_, "--json", "--endpoints", cli.endpoint, "--key-prefix",
                    cli.key_prefix)
    processes.append(process)
    lines = Lines(process, process.stdout)
    status = json.loads(await asyncio.to_thread(lines.next))
    assert (status["run_id"], status["handler"], status["change"]) == (run_, "native", "status")
    assert [(node["node"], node["rank"]) for node in status["native"]["nodes"]] == \
        [("n_1_0", 0), ("n_1_1", 1)]
    await group[0].leave()
    left = json.loads(await asyncio.to_thread(lines.next))
    assert (left["change"], left["round"], left["node"]) == ("left", 1, "n_1_0")
    assert left["revision"] > status["revision"] and left["native"]["nodes"] is None
    assert left["native"]["counts"]["gone"] == 1
    process.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(process.wait, 30) == EXIT_OK


# --- usage, help, version ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status"], "the following arguments are required: RUN_ID"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["cleanup", "--older-than", "2x"], "invalid duration '2x'"),
        # The option's own message (etcd_rdzv.config), then the flag that set it.
        (["status", "r", "--timeout", "0"], "read_timeout='0'. (set by --timeout)"),
        (["close", "r", "--ttl", "0"], "ttl='0'. (set by --ttl)"),
        (["close", "r", "--ttl", "-1"], "ttl='-1'. (set by --ttl)"),
        (["close", "r", "--ttl", "2h"], "ttl='2h'. (set by --ttl)"),
        (["status", "r", "--endpoints", "h:99999"],
         "endpoint='h:99999' must be an integer between 1 and 65535. (set by --endpoints)"),
        (["status", "r", "--endpoints", ""],
         "--endpoints '' is empty: give H:P[,H:P...], or leave it out to use "
         "$ETCD_RDZV_ENDPOINTS (unset; else localhost:2379)"),
        (["status", "a/b"], "The run id must be a non-empty string without '/'"),
        (["status", "r", "--ca-cert", "/nonexistent.pem"],
         "ca_cert='/nonexistent.pem' does not exist or is not a regular file. (set by "
         "--ca-cert)"),
        (["status", "r", "--password-file", "/etc/hostname"], "no username"),
        (["list", "--key-prefix", "/"], "key_prefix='/'"),
        (["serve", "--port", "70000"], "argument --port: invalid port '70000'"),
        (["serve", "--host", "localhost"], "--host 'localhost' is not an IP address"),
        # TEST-NET-1 (RFC 5737): an address no machine has.
        (["serve", "--host", "192.0.2.1"], "--host 192.0.2.1 is not an address of this machine"),
        (["serve", "--host", "0.0.0.0"],
         "--host 0.0.0.0 would serve etcd to every network of this machine, with no "
         "authentication and no TLS; add --expose"),
    ],
)
def test_usage_errors_exit_2_with_one_line_naming_the_option(
    argv: list[str], message: str
) -> None:
    result = run(*argv)
    assert result.out == ""
    assert message in result.failed_with(EXIT_USAGE)


def test_the_endpoints_from_the_environment_are_named_as_such(cli: Cli) -> None:
    run_ = run_id()
    seed(cli.endpoint, cli.key_prefix, run_)
    env = cli_env(ETCD_RDZV_ENDPOINTS=cli.endpoint)
    result = run("status", run_, "--key-prefix", cli.key_prefix, env=env)
    assert result.code == EXIT_OK and "participant" in result.out

    bad = run("status", "r", env=cli_env(ETCD_RDZV_ENDPOINTS="h:99999"))
    assert bad.failed_with(EXIT_USAGE).endswith("(set by $ETCD_RDZV_ENDPOINTS)")
    empty = run("status", "r", env=cli_env(ETCD_RDZV_ENDPOINTS=" "))
    assert "$ETCD_RDZV_ENDPOINTS is set but empty (' ')" in empty.failed_with(EXIT_USAGE)
    # An empty --endpoints does not fall back silently on the environment's value.
    flag = run("status", "r", "--endpoints", "", env=env)
    assert f"use $ETCD_RDZV_ENDPOINTS ({cli.endpoint!r})" in flag.failed_with(EXIT_USAGE)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = run(*([command] if command else []), "--help")
    assert result.code == EXIT_OK
    assert result.out.startswith(f"usage: etcd-rdzv{' ' + command if command else ''}")
    table = [f"  {code:>3}  {text.split()[0]}" for code, text in EXIT_CODES.items()]
    if command is None:
        for row in table:  # the exit codes, once: in the top-level help
            assert row in result.out
    else:
        assert "exit codes: see etcd-rdzv --help" in result.out
        assert not any(row in result.out for row in table)
    if command not in (None, "serve"):
        for flag in ("--endpoints", "--key-prefix", "--ca-cert", "--cert", "--key", "--user",
                     "--password-file", "--timeout"):
            assert flag in result.out


def test_defaults_in_the_help_come_from_the_configuration() -> None:
    from etcd_rdzv.config import DEFAULT_KEY_PREFIX, DEFAULT_TTL

    assert re.search(rf"default\s+{DEFAULT_TTL}\b", run("close", "--help").out)
    assert DEFAULT_KEY_PREFIX in run("list", "--help").out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    result = run(flag)
    assert (result.code, result.out, result.err) == \
        (EXIT_OK, f"etcd-rdzv {etcd_rdzv.__version__}\n", "")


def test_exit_codes_are_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"exit code {code} undocumented"


def test_parse_duration() -> None:
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("1d") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    assert parse_duration("1.5h") == 5400
    for bad in ("", "h", "2x", "-1h", "1 h"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


# --- an etcd that cannot be reached -------------------------------------------------------------

def test_an_unreachable_etcd_exits_4_naming_where_the_endpoint_came_from() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    result = run("list", "--timeout", "1", env=cli_env(ETCD_RDZV_ENDPOINTS=endpoint))
    assert result.code == EXIT_UNREACHABLE and "Traceback" not in result.err
    refused, final = result.err.splitlines()
    assert refused.startswith(f"etcd-rdzv: nothing listens at {endpoint} yet (connection "
                              "refused); trying until --timeout (1 s).")
    assert "is unavailable" in final and "Gave up after 1 s" in final
    for line in (refused, final):
        assert line.endswith(f"Using the endpoints {endpoint} (from $ETCD_RDZV_ENDPOINTS).")

    result = run("list", "--timeout", "1", "--endpoints", endpoint)
    assert result.err.splitlines()[-1].endswith("(from --endpoints).")


def test_a_refused_connection_is_reported_while_the_command_still_waits(
    processes: list[subprocess.Popen[str]],
) -> None:
    """Without any endpoint setting: the default, and how to change it, said at once."""
    process = start("list", "--endpoints", f"127.0.0.1:{free_port()}", "--timeout", "600")
    processes.append(process)
    line = Lines(process, process.stderr).next()
    assert "nothing listens at" in line and "trying until --timeout (600 s)" in line
    assert process.poll() is None  # still trying
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == EXIT_INTERRUPTED


def test_the_default_endpoint_says_how_to_set_another() -> None:
    """localhost:2379 is the default; the test cannot know what listens there, so it asks
    about the message only (printed at once when refused, at the deadline otherwise)."""
    result = run("status", "r", "--timeout", "1")
    if result.code in (EXIT_OK, EXIT_NOT_FOUND):
        pytest.skip("an etcd answers on localhost:2379 on this machine")
    assert result.code == EXIT_UNREACHABLE
    assert ("Using the endpoints localhost:2379 (the default: neither --endpoints nor "
            "$ETCD_RDZV_ENDPOINTS is set; set one, or start a development etcd with "
            "`etcd-rdzv serve`).") in result.err


def test_a_name_that_does_not_resolve_fails_at_once() -> None:
    # .invalid never resolves (RFC 2606); --timeout is far longer than the run's timeout.
    result = run("list", "--endpoints", "etcd.invalid:2379", "--timeout", "600", timeout=60)
    message = result.failed_with(EXIT_UNREACHABLE)
    assert message.startswith("etcd-rdzv: The etcd endpoint etcd.invalid:2379 does not "
                              "resolve (")
    assert message.endswith("Using the endpoints etcd.invalid:2379 (from --endpoints).")


# --- security flags -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        server.enable_auth("root-secret")
        server.add_user("alice", "alice-secret", "/jobs/")
        yield server


def test_user_and_password_file(auth_server: EtcdServer, tmp_path: Path) -> None:
    endpoint = auth_server.get_endpoint()
    seed(endpoint, "/jobs", "train", config={"username": "alice", "password": "alice-secret"})
    secret = tmp_path / "password"
    secret.write_text("alice-secret\n")
    base = ["--endpoints", endpoint, "--user", "alice"]

    result = run("status", "train", "--key-prefix", "/jobs", *base, "--password-file",
                 str(secret))
    assert result.code == EXIT_OK and "participant" in result.out

    env = cli_env(ETCD_RDZV_PASSWORD="alice-secret")
    result = run("list", "--key-prefix", "/jobs", *base, env=env)
    assert result.code == EXIT_OK and "train" in result.out

    # Outside alice's prefix: permission denied, exit 5.
    result = run("list", "--key-prefix", "/other", *base, env=env)
    assert "permission denied" in result.failed_with(EXIT_AUTH)

    result = run("list", "--key-prefix", "/jobs", *base, env=cli_env(ETCD_RDZV_PASSWORD="no"))
    assert "rejected the credentials of user 'alice'" in result.failed_with(EXIT_AUTH)

    result = run("list", "--key-prefix", "/jobs", *base)
    assert "password (password_file or $ETCD_RDZV_PASSWORD) is missing" in \
        result.failed_with(EXIT_USAGE)



def test_tls_flags(certs: TlsCertificates) -> None:
    with EtcdServer(tls=certs, client_cert_auth=True) as server:
        endpoint = server.get_endpoint()
        tls: dict[str, Any] = {"protocol": "https", "ca_cert": certs.ca_cert,
                               "ssl_cert": certs.client_cert, "ssl_cert_key": certs.client_key}
        seed(endpoint, "/tls", "secure", config=tls)
        flags = ["--endpoints", endpoint, "--key-prefix", "/tls", "--ca-cert",
                 str(certs.ca_cert), "--cert", str(certs.client_cert), "--key",
                 str(certs.client_key)]
        # A certificate flag alone means https.
        result = run("status", "secure", *flags)
        assert result.code == EXIT_OK and "participant" in result.out
        # Plaintext to a TLS port fails at once (EtcdTLSError), saying what to set: exit 4.
        result = run("status", "secure", "--endpoints", endpoint, "--timeout", "600")
        assert "set protocol=https and ca_cert" in result.failed_with(EXIT_UNREACHABLE)
        # A CA that did not sign the server's certificate: exit 4 too.
        other = make_certificates(Path(certs.ca_cert).parent / "other")
        result = run("status", "secure", *flags[:4], "--ca-cert", str(other.ca_cert),
                     "--timeout", "600")
        assert "is not signed by ca_cert=" in result.failed_with(EXIT_UNREACHABLE)
        result = run("status", "secure", *flags, "--protocol", "http")
        assert "needs protocol=https" in result.failed_with(EXIT_USAGE)


# --- long-running commands and signals ------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_watch_prints_changes_until_a_signal(
    signum: signal.Signals, etcd_server: EtcdServer, key_prefix: str,
    processes: list[subprocess.Popen[str]],
) -> None:
    run_ = run_id()
    endpoint = etcd_server.get_endpoint()
    seed(endpoint, key_prefix, run_, nodes=1)
    process = start("watch", run_, "--key-prefix", key_prefix, "--json",
                    env=cli_env(ETCD_RDZV_ENDPOINTS=endpoint))
    processes.append(process)
    lines = Lines(process, process.stdout)
    first = json.loads(lines.next())
    assert first["run_id"] == run_ and first["state"]["world_size"] == 1
    seed(endpoint, key_prefix, f"{run_}-other")  # another run: not reported

    async def overwrite() -> int:
        cfg = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=10)
        async with EtcdClient(cfg) as client:
            backend = AsyncEtcdRendezvousBackend(client, run_, key_prefix=key_prefix)
            current = await backend.get_state()
            assert current is not None
            result = await backend.set_state(torch_state(4), current[1])
            assert result is not None and result[2]
            return result[1]

    revision = asyncio.run(overwrite())
    second = json.loads(lines.next())
    assert second["revision"] == revision and second["state"]["world_size"] == 4
    process.send_signal(signum)
    assert process.wait(30) == EXIT_OK
    assert process.stderr is not None and process.stderr.read() == ""


def etcd_processes_using(data_dir: str) -> list[int]:
    """The pids of processes whose command line names ``data_dir`` (the served etcd)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if data_dir in cmdline and "etcd" in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


#: How long `serve` may take to print its banner: etcd's own start timeout (60 s), and more.
SERVE_START = 90.0
BANNER = re.compile(r"etcd is serving on (\S+) \(started in [\d.]+ s, data in (\S+), ")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_until_a_signal_and_leave_nothing_behind(
    signum: signal.Signals, processes: list[subprocess.Popen[str]],
) -> None:
    process = start("serve", "--port", "0")
    processes.append(process)
    lines = Lines(process, process.stdout)
    banner = lines.next(SERVE_START)
    match = BANNER.match(banner)
    assert match, banner
    endpoint, data_dir = match.groups()
    assert lines.next().strip() == f"export ETCD_RDZV_ENDPOINTS={endpoint}"
    assert etcd_processes_using(data_dir), "no etcd process found"

    # Use it: write a run, read it back through the command.
    seed(endpoint, "/served", "dev")
    result = run("status", "dev", "--endpoints", endpoint, "--key-prefix", "/served")
    assert result.code == EXIT_OK and "participant" in result.out

    process.send_signal(signum)
    assert process.wait(30) == EXIT_OK
    assert process.stderr is not None and process.stderr.read() == "Stopping etcd.\n"
    assert etcd_processes_using(data_dir) == []
    assert not Path(data_dir).exists()
    assert run("list", "--endpoints", endpoint, "--timeout", "1").code == EXIT_UNREACHABLE


def loopback_host() -> str:
    """One of the loopback addresses 127.x.y.z (all of them are loopback on Linux): keeps a
    test off a developer's etcd on 127.0.0.1:2379 and off another test run's."""
    return f"127.{random.randrange(1, 255)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def listening(host: str, port: int) -> socket.socket | None:
    """A socket listening on ``host:port``, or None if the port is taken already."""
    sock = socket.socket(socket.AF_INET)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_serve_uses_port_2379_when_it_is_free(processes: list[subprocess.Popen[str]]) -> None:
    host = loopback_host()
    probe = listening(host, 2379)
    if probe is None:
        pytest.skip(f"{host}:2379 is taken on this machine")
    probe.close()
    process = start("serve", "--host", host)
    processes.append(process)
    match = BANNER.match(Lines(process, process.stdout).next(SERVE_START))
    assert match and match.group(1) == f"{host}:2379"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == EXIT_OK


def test_serve_when_port_2379_is_taken(processes: list[subprocess.Popen[str]]) -> None:
    host = loopback_host()
    held = listening(host, 2379)
    if held is None:
        pytest.skip(f"{host}:2379 is taken on this machine")
    with held:
        explicit = start("serve", "--host", host, "--port", "2379")
        processes.append(explicit)
        assert explicit.wait(30) == EXIT_ERROR
        assert explicit.stderr is not None and explicit.stderr.read() == (
            f"etcd-rdzv: --port 2379 is taken on {host}: stop what listens there, or give "
            "another --port (0: any free port).\n")

        process = start("serve", "--host", host)
        processes.append(process)
        match = BANNER.match(Lines(process, process.stdout).next(SERVE_START))
        assert match and match.group(1) != f"{host}:2379"
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == EXIT_OK
        assert process.stderr is not None
        assert process.stderr.read().splitlines() == [
            f"etcd-rdzv: port 2379 is taken on {host} (another etcd?); serving on a free "
            "port instead (--port chooses one).",
            "Stopping etcd."]


def test_serve_on_every_interface_only_with_expose_and_a_warning(
    processes: list[subprocess.Popen[str]],
) -> None:
    process = start("serve", "--host", "0.0.0.0", "--expose", "--port", "0")
    processes.append(process)
    match = BANNER.match(Lines(process, process.stdout).next(SERVE_START))
    assert match, "no banner"
    port = match.group(1).rsplit(":", 1)[1]
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == EXIT_OK
    assert process.stderr is not None
    warning = process.stderr.read().splitlines()[0]
    assert warning == (f"etcd-rdzv: WARNING: etcd serves 0.0.0.0:{port} without authentication "
                       f"and without TLS: whoever reaches port {port} of this machine can read, "
                       "change and delete every key.")
