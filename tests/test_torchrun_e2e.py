"""torchrun end to end: real torchrun nodes (agents) train examples/train.py over etcd-v3.

Every node is one ``torchrun --rdzv-backend=etcd-v3`` process with 2 gloo workers, on
loopback (``--local-addr=127.0.0.1``, ``GLOO_SOCKET_IFNAME=lo``); the plug-in is found
through the ``torchrun.handlers`` entry point of the installed package. The node machinery
(start, kill a whole node, parse the workers' lines) is examples/torchrun_demo.py's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pickle
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    create_handler as torch_create_handler,
)

from etcd_rdzv import Deadline, EtcdClient
from etcd_rdzv.codec import StateCodec
from etcd_rdzv.config import BACKEND_OPTIONS, EtcdConfig, parse_endpoints
from etcd_rdzv.elastic import create_backend
from etcd_rdzv.keys import RunKeys
from etcd_rdzv.testing import EtcdServer, find_etcd_binary
from examples.torchrun_demo import (
    LOCAL_ADDR,
    DemoError,
    TorchrunNode,
    WorkerLine,
    describe,
    run_demo,
    torchrun_command,
    wait_for,
)

pytestmark = pytest.mark.slow

#: Every end-to-end scenario runs for both rendezvous handlers (--rdzv-conf handler=...).
HANDLERS = pytest.mark.parametrize("handler", ["torch", "native"])

NPROC = 2
#: How long any one torchrun node may take, start to exit, on a busy machine.
NODE_TIMEOUT = 120.0


def _run_id() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def _nodes(*nodes: TorchrunNode) -> Iterator[list[TorchrunNode]]:
    """Start the nodes; kill whatever is left of them (torchrun and workers) on the way out."""
    try:
        for node in nodes:
            node.start()
        yield list(nodes)
    finally:
        for node in nodes:
            node.close()


def _finish(nodes: list[TorchrunNode]) -> None:
    """Wait for every node to exit; fail with their output unless all exit with 0."""
    codes = {}
    for node in nodes:
        try:
            codes[node.name] = node.wait(NODE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{node.name} still runs after {NODE_TIMEOUT:g} s\n{describe(nodes)}")
    assert set(codes.values()) == {0}, f"exit codes {codes}\n{describe(nodes)}"


def _results(nodes: list[TorchrunNode]) -> list[WorkerLine]:
    return sorted((line for node in nodes for line in node.worker_lines("RESULT")),
                  key=lambda line: line.rank)


# Reading etcd from the test.

@dataclass(frozen=True)
class _Key:
    key: bytes
    value: bytes
    lease: int


def _etcd_config(endpoint: str, username: str | None = None,
                 password: str | None = None) -> EtcdConfig:
    return EtcdConfig(endpoints=parse_endpoints(endpoint), username=username,
                      password=password, read_timeout=10.0, request_timeout=3.0,
                      connect_timeout=5.0)


def _read_prefix(config: EtcdConfig, prefix: str) -> tuple[list[_Key], int]:
    """Every key under ``prefix`` now, and the revision read at."""
    async def read() -> tuple[list[_Key], int]:
        async with EtcdClient(config) as client:
            response = await client.get_prefix(prefix.encode(), Deadline.after(10.0))
            return ([_Key(bytes(kv.key), bytes(kv.value), int(kv.lease))
                     for kv in response.kvs], int(response.header.revision))

    return asyncio.run(read())


def _lease_seconds_left(config: EtcdConfig, lease: int) -> int:
    async def read() -> int:
        async with EtcdClient(config) as client:
            return (await client.lease_status(lease, Deadline.after(10.0))).ttl

    return asyncio.run(read())


def _decode_state(key: bytes, value: bytes) -> Any:
    """torch's ``_RendezvousState`` from the value of the state key."""
    return pickle.loads(StateCodec().decode(value, key=key))


class _Watch:
    """``etcdctl watch --prefix`` from a revision on: every put and delete under a prefix."""

    def __init__(self, endpoint: str, prefix: str, revision: int) -> None:
        self.events: list[tuple[str, bytes, bytes]] = []
        self._lock = threading.Lock()
        self._process = subprocess.Popen(
            [find_etcd_binary("etcdctl"), f"--endpoints={endpoint}", "watch", "--prefix",
             prefix, f"--rev={revision}", "-w", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self._process.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self._process.stdout,),
                                        daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            with contextlib.suppress(ValueError):
                response = json.loads(line)
                for event in response.get("Events") or []:
                    kind = "DELETE" if event.get("type") == 1 else "PUT"
                    kv = event["kv"]
                    key = base64.b64decode(kv["key"])
                    value = base64.b64decode(kv.get("value", ""))
                    with self._lock:
                        self.events.append((kind, key, value))

    def snapshot(self) -> list[tuple[str, bytes, bytes]]:
        with self._lock:
            return list(self.events)

    def last_event(self) -> dict[bytes, tuple[str, bytes]]:
        """Each key's last event, put or delete."""
        return {key: (kind, value) for kind, key, value in self.snapshot()}

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._reader.join(5.0)


# 1. Two nodes meet.

@pytest.mark.timeout(240)
@HANDLERS
def test_two_nodes_train_in_one_world(etcd_server: EtcdServer, key_prefix: str,
                                      handler: str) -> None:
    command = torchrun_command(
        etcd_server.get_endpoint(), _run_id(), nnodes="2", nproc_per_node=NPROC,
        max_restarts=0, rdzv_conf={"key_prefix": key_prefix, "handler": handler},
        script_args=["--steps", "3"],
    )
    with _nodes(TorchrunNode("node-a", command), TorchrunNode("node-b", command)) as nodes:
        _finish(nodes)
        results = _results(nodes)

        world = 2 * NPROC
        assert [line.rank for line in results] == list(range(world)), describe(nodes)
        for line in results:
            assert line.world == world
            assert line.restart == 0
            assert line.int_field("sum") == world * (world - 1) // 2  # 0+1+2+3, all_reduce
            assert line.fields["in_sync"] == "1"  # the gradient all_reduce kept replicas equal
        # Each node ran 2 local workers and was one group rank.
        for node in nodes:
            mine = node.worker_lines("RESULT")
            assert sorted(line.local for line in mine) == list(range(NPROC))
            assert len({line.group for line in mine}) == 1
        assert {line.group for line in results} == {0, 1}
        # Both agents joined the same round, as ranks 0 and 1 of 2 nodes.
        records = [record for node in nodes for record in node.rendezvous()]
        assert len({record.round for record in records}) == 1
        assert sorted(record.node_rank for record in records) == [0, 1]
        assert {record.nodes for record in records} == {2}


# 2. Elastic membership: a node dies, the job goes on, a node joins later.

@pytest.mark.timeout(300)
@HANDLERS
def test_node_lost_then_new_node_admitted(etcd_server: EtcdServer, key_prefix: str,
                                          handler: str) -> None:
    progress: list[str] = []
    # node-a and node-b train in a world of 4; node-b is killed (torchrun and workers,
    # SIGKILL); node-a re-rendezvouses alone (world 2); node-b' starts and is admitted in
    # the next round (world 4); both finish. run_demo raises, with the output, otherwise.
    summary = run_demo(etcd_server.get_endpoint(), steps=10, sleep=0.3,
                       nproc_per_node=NPROC, timeout=NODE_TIMEOUT,
                       extra_conf={"key_prefix": key_prefix, "handler": handler},
                       say=progress.append)
    node_a, node_b, node_b2 = summary.nodes
    context = "\n".join(progress) + "\n" + describe(summary.nodes)
    full = 2 * NPROC

    # node-a's workers: in a world of 4; after node-b's death they failed, and torchrun
    # restarted them (restart 1) in a world of 2.
    started_a = node_a.worker_lines("STARTED")
    assert (full, 0) in {(line.world, line.restart) for line in started_a}, context
    assert next(line.world for line in started_a if line.restart == 1) == NPROC, context
    # The killed node never finished; the survivor and the newcomer did, together.
    assert node_b.worker_lines("RESULT") == []
    assert node_b.returncode == -signal.SIGKILL
    results = _results([node_a, node_b2])
    assert [line.rank for line in results] == list(range(full)), context
    assert {line.world for line in results} == {full}
    assert {line.int_field("sum") for line in results} == {full * (full - 1) // 2}
    # A failure counts as a restart; a membership change does not.
    assert {line.restart for line in node_a.worker_lines("RESULT")} == {1}
    assert {line.restart for line in node_b2.worker_lines("RESULT")} == {0}
    assert {line.restart for line in node_b2.worker_lines("STARTED")} == {0}

    # Either handler: rounds go up; the world went 4 -> 2 -> 4 workers. (Had node-b come
    # too late for round 0, node-a would have started alone: 2 -> 4 -> 2 -> 4.)
    rounds = summary.rounds()
    assert list(rounds) == sorted(rounds) and len(rounds) >= 3, context
    sizes = summary.world_sizes(NPROC)
    assert sizes[-1] == full and sizes[-2] == NPROC and full in sizes[:-2], context
    final = max(rounds)
    assert sorted(record.node for record in rounds[final]) == ["node-a", "node-b'"]
    shrunk = next(number for number, records in rounds.items() if records[0].nodes == 1)
    assert [record.node for record in rounds[shrunk]] == ["node-a"]
    assert final > shrunk


# 3. A finished run closes the rendezvous, and its keys expire.

@pytest.mark.timeout(240)
@HANDLERS
def test_finished_run_is_closed_and_expires(etcd_server: EtcdServer, key_prefix: str,
                                            handler: str) -> None:
    endpoint = etcd_server.get_endpoint()
    config = _etcd_config(endpoint)
    run_id = _run_id()
    keys = RunKeys(run_id, key_prefix)
    _, revision = _read_prefix(config, key_prefix + "/")
    watch = _Watch(endpoint, key_prefix + "/", revision + 1)
    command = torchrun_command(
        endpoint, run_id, nnodes="1", nproc_per_node=NPROC, max_restarts=0,
        # keep_alive_interval below the ttl, so that the state outlives the job's quiet spells.
        rdzv_conf={"ttl": 3, "key_prefix": key_prefix, "keep_alive_interval": 1,
                   "last_call_timeout": 1, "handler": handler},
        script_args=["--steps", "3"],
    )
    # torch's handler: a handler of the same run, as another agent would have; it only reads.
    # (A native handler would be a node of the run, and its keep-alives would keep the run.)
    params = RendezvousParameters(backend="etcd-v3", endpoint=endpoint, run_id=run_id,
                                  min_nodes=1, max_nodes=1, local_addr=LOCAL_ADDR,
                                  key_prefix=key_prefix, ttl="3")
    backend, store = create_backend(params) if handler == "torch" else (None, None)

    def closed_written() -> bool:
        if handler == "native":
            return watch.last_event().get(keys.closed, ("", b""))[0] == "PUT"
        kind, value = watch.last_event().get(keys.state, ("", b""))
        return kind == "PUT" and bool(_decode_state(keys.state, value).closed)

    try:
        with _nodes(TorchrunNode("node", command)) as nodes:
            # torchrun's shutdown closes the run (the keys live ttl = 3 s after that).
            wait_for(closed_written, NODE_TIMEOUT, "the closed run in etcd", nodes)
            if backend is not None and store is not None:
                assert torch_create_handler(store, backend, params).is_closed(), \
                    describe(nodes)
            _finish(nodes)
            assert len(_results(nodes)) == NPROC

        # Nothing renews the keys any more: all of them expire (the native node revoked
        # its lease on shutdown; the run lease and the store's lease run out).
        deadline = time.monotonic() + 30.0
        while (left := _read_prefix(config, key_prefix + "/")[0]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert [item.key for item in left] == []
        wait_for(lambda: all(kind == "DELETE" for kind, _ in watch.last_event().values()),
                 10.0, "the watch to see every deletion")
        written = {key for kind, key, _ in watch.snapshot() if kind == "PUT"}
        store_keys = {key for key in written if key.startswith(keys.store_prefix)}
        assert any(key.endswith(b"/MASTER_ADDR") for key in store_keys), sorted(written)
        if handler == "torch":
            assert written == {keys.state} | store_keys  # nothing outside the run's namespace
        else:
            assert keys.closed in written
            assert all(key.startswith(keys.run_prefix) for key in written), sorted(written)
    finally:
        watch.close()
        if backend is not None:
            backend.close()


# 4. An etcd outage longer than read_timeout and the heartbeat timeout.

#: Why torch's handler cannot admit a node after such an outage (docs/native.md).
TORCH_PURGES_AFTER_OUTAGE = (
    "torch's handler keeps each node's heartbeat as a timestamp in its one state; after an "
    "outage longer than keep_alive_interval * keep_alive_max_attempt its _sanitize finds "
    "every heartbeat stale and removes every participant, so the new node never joins the "
    "training world (handler=native keeps heartbeats on leases, which etcd extends)")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("handler", [
    "native",
    pytest.param("torch", marks=pytest.mark.xfail(reason=TORCH_PURGES_AFTER_OUTAGE,
                                                   raises=DemoError, strict=True)),
])
def test_training_survives_an_etcd_outage_and_admits_a_node_after(handler: str) -> None:
    outage = 15.0  # longer than read_timeout (10 s) and the heartbeat timeout (1 s x 3)
    with EtcdServer() as server:
        command = torchrun_command(
            server.get_endpoint(), _run_id(), nnodes="2:3", nproc_per_node=NPROC,
            max_restarts=3,
            rdzv_conf={"handler": handler, "read_timeout": 10, "keep_alive_interval": 1,
                       "keep_alive_max_attempt": 3, "last_call_timeout": 2,
                       "join_timeout": 120},
            # Train through the outage; in a world below 3 nodes, wait for the newcomer.
            script_args=["--steps", "100", "--sleep", "0.2", "--min-world", str(3 * NPROC),
                         "--min-world-timeout", "60"],
        )
        first, second = TorchrunNode("node-a", command), TorchrunNode("node-b", command)
        with _nodes(first, second) as nodes:
            wait_for(lambda: all(len([line for line in node.worker_lines("STARTED")
                                      if line.world == 2 * NPROC]) == NPROC
                                 for node in nodes),
                     NODE_TIMEOUT, "both nodes to train in a world of 4", nodes,
                     must_run=nodes)
            server.kill(0)
            time.sleep(outage)
            # The agents neither failed nor stopped their workers while etcd was away.
            assert all(node.running for node in nodes), describe(nodes)
            assert all(line.restart == 0 for node in nodes
                       for line in node.worker_lines("STARTED")), describe(nodes)
            server.restart(0)
            back = time.monotonic()
            with _nodes(TorchrunNode("node-c", command)) as late:
                everyone = nodes + late
                wait_for(lambda: sum(1 for node in everyone for line in
                                     node.worker_lines("STARTED")
                                     if line.world == 3 * NPROC and line.at >= back)
                         == 3 * NPROC, 60.0, "all three nodes to train in a world of 6",
                         everyone)
                _finish(everyone)
                results = _results(everyone)
                assert [line.rank for line in results] == list(range(3 * NPROC))


# 5. Every option through --rdzv-conf.

_PASSWORD = "s3cret-e2e"
#: torch's DynamicRendezvousHandler options (dynamic_rendezvous.create_handler).
HANDLER_OPTIONS = frozenset({"join_timeout", "last_call_timeout", "close_timeout",
                             "heartbeat_timeout", "keep_alive_interval",
                             "keep_alive_max_attempt"})
#: They need an etcd that serves TLS; test_invalid_option_fails_naming_it shows they are read.
TLS_OPTIONS = frozenset({"ca_cert", "ssl_cert", "ssl_cert_key"})


@pytest.fixture
def auth_etcd() -> Iterator[EtcdServer]:
    """An etcd of its own with authentication on: user root, password :data:`_PASSWORD`."""
    server = EtcdServer()
    server.start()
    try:
        etcdctl = find_etcd_binary("etcdctl")
        for args in (["user", "add", f"root:{_PASSWORD}"], ["user", "grant-role", "root", "root"],
                     ["auth", "enable"]):
            subprocess.run([etcdctl, f"--endpoints={server.get_endpoint()}", *args],
                           check=True, capture_output=True, timeout=30)
        yield server
    finally:
        server.stop()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    """The root password of :func:`auth_etcd`, in a file for ``password_file``."""
    path = tmp_path / "password"
    path.write_text(_PASSWORD + "\n")
    return path


@pytest.mark.timeout(240)
def test_every_option_passes_through_rdzv_conf(auth_etcd: EtcdServer, password_file: Path,
                                                key_prefix: str) -> None:
    endpoint = auth_etcd.get_endpoint()
    run_id = _run_id()
    conf: dict[str, object] = {
        # torch's DynamicRendezvousHandler
        "join_timeout": 60,
        "last_call_timeout": 1,
        "close_timeout": 10,
        "heartbeat_timeout": 5,
        "keep_alive_interval": 1,
        "keep_alive_max_attempt": 3,
        # etcd_rdzv's backend, all but the TLS files (they need an etcd serving TLS)
        "protocol": "HTTP",
        "read_timeout": 20,
        "request_timeout": 3,
        "connect_timeout": 5,
        "username": "root",
        "password_file": password_file,
        "key_prefix": key_prefix,
        "ttl": 30,
        "compress_threshold": 0,
        "max_request_bytes": 65536,
        "conflict_backoff": 0.05,
        "wait": "watch",
        "compact_interval": 1,  # compacts etcd's whole history: this etcd is the test's own
        "verify_state": "true",
        "handler": "torch",
    }
    assert set(conf) >= HANDLER_OPTIONS | (BACKEND_OPTIONS - TLS_OPTIONS)
    command = torchrun_command(endpoint, run_id, nnodes="1", nproc_per_node=NPROC,
                               max_restarts=0, rdzv_conf=conf, script_args=["--steps", "2"])
    with _nodes(TorchrunNode("node", command)) as nodes:
        _finish(nodes)
        assert [line.world for line in _results(nodes)] == [NPROC] * NPROC, describe(nodes)
        assert "nobody reads" not in nodes[0].output()  # every key was recognised

    # The options took effect: the state sits under key_prefix, in etcd with authentication
    # (so username and password_file were used), compressed (compress_threshold=0), closed,
    # on a lease of ttl + window seconds.
    config = _etcd_config(endpoint, "root", _PASSWORD)
    keys = {item.key: item for item in _read_prefix(config, key_prefix + "/")[0]}
    state_key = f"{key_prefix}/{run_id}".encode()
    assert state_key in keys, sorted(keys)
    state = keys[state_key]
    assert state.value[:4] == b"ERDZ" and state.value[5] & 1, "the state is not compressed"
    assert _decode_state(state_key, state.value).closed
    assert 0 < _lease_seconds_left(config, state.lease) <= 30 + 3


@pytest.mark.timeout(240)
def test_every_native_option_passes_through_rdzv_conf(auth_etcd: EtcdServer,
                                                       password_file: Path,
                                                       key_prefix: str) -> None:
    endpoint = auth_etcd.get_endpoint()
    run_id = _run_id()
    conf: dict[str, object] = {
        "join_timeout": 60, "last_call_timeout": 1, "close_timeout": 10,
        "heartbeat_timeout": 5, "keep_alive_interval": 1, "keep_alive_max_attempt": 3,
        "protocol": "HTTP", "read_timeout": 20, "request_timeout": 3, "connect_timeout": 5,
        "username": "root", "password_file": password_file, "key_prefix": key_prefix,
        "ttl": 30, "handler": "native",
    }
    command = torchrun_command(endpoint, run_id, nnodes="1", nproc_per_node=NPROC,
                               max_restarts=0, rdzv_conf=conf, script_args=["--steps", "2"])
    with _nodes(TorchrunNode("node", command)) as nodes:
        _finish(nodes)
        assert [line.world for line in _results(nodes)] == [NPROC] * NPROC, describe(nodes)
        assert "nobody reads" not in nodes[0].output()
        assert "only handler=torch reads" not in nodes[0].output()
    # Under key_prefix, with authentication, closed, on the run lease of ttl seconds.
    config = _etcd_config(endpoint, "root", _PASSWORD)
    keys = {item.key: item for item in _read_prefix(config, key_prefix + "/")[0]}
    closed = RunKeys(run_id, key_prefix).closed
    assert closed in keys, sorted(keys)
    assert 0 < _lease_seconds_left(config, keys[closed].lease) <= 30


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("conf", "expected"), [
    ("ttl=abc", "ttl='abc'"),
    ("read_timeout=0", "read_timeout='0'"),
    ("protocol=https,ca_cert=/nonexistent/ca.pem", "ca_cert='/nonexistent/ca.pem'"),
    ("protocol=https,ssl_cert=/nonexistent/c.pem", "ssl_cert='/nonexistent/c.pem'"),
])
def test_invalid_option_fails_naming_it(etcd_server: EtcdServer, conf: str,
                                        expected: str) -> None:
    command = torchrun_command(etcd_server.get_endpoint(), _run_id(), nnodes="1",
                               nproc_per_node=NPROC, max_restarts=0, rdzv_conf=conf,
                               script_args=["--steps", "1"])
    with _nodes(TorchrunNode("node", command)) as nodes:
        code = nodes[0].wait(NODE_TIMEOUT)
        output = nodes[0].output()
    assert code != 0
    assert "ValueError" in output and expected in output, output[-3000:]
    assert nodes[0].worker_lines() == []  # it failed before starting any worker
