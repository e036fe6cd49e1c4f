"""The etcd-rdzv command: in-process through main([...]), as `python -m etcd_rdzv.cli` and as
the installed console script, against real etcd servers (plain, TLS, with auth)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from etcd_rdzv import AsyncEtcdRendezvousBackend, AsyncEtcdStore, EtcdClient, EtcdConfig
from etcd_rdzv.cli import (
    EXIT_AUTH,
    EXIT_CODES,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    main,
    parse_duration,
)
from etcd_rdzv.config import parse_endpoints
from etcd_rdzv.testing import EtcdServer, TlsCertificates, free_port, make_certificates
from etcd_rdzv.testing.states import torch_state

COMMANDS = ["serve", "status", "list", "watch", "close", "delete", "cleanup"]


def seed(endpoint: str, key_prefix: str, run_id: str, nodes: int = 3, store_keys: int = 1,
         config: dict[str, Any] | None = None, ttl: int = 600) -> None:
    """Write a torch state (and store keys) for ``run_id``, as an agent would."""
    async def write() -> None:
        cfg = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=10, **(config or {}))
        async with EtcdClient(cfg) as client:
            backend = AsyncEtcdRendezvousBackend(client, run_id, key_prefix=key_prefix, ttl=ttl)
            assert await backend.set_state(torch_state(nodes)) is not None
            store = AsyncEtcdStore(client, f"{key_prefix}/{run_id}/store/".encode(),
                                   backend.lease)
            for index in range(store_keys):
                await store.set(f"k{index}", "v")

    asyncio.run(write())


class Cli:
    """``main([...])`` with the server's endpoint and the test's key prefix."""

    def __init__(self, capsys: pytest.CaptureFixture[str], endpoint: str, key_prefix: str):
        self.capsys, self.endpoint, self.key_prefix = capsys, endpoint, key_prefix

    def __call__(self, *argv: str, connect: bool = True) -> tuple[int, str, str]:
        self.capsys.readouterr()
        extra = ["--endpoints", self.endpoint, "--key-prefix", self.key_prefix] if connect else []
        code = main([*argv, *extra])
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], etcd_server: EtcdServer, key_prefix: str) -> Cli:
    return Cli(capsys, etcd_server.get_endpoint(), key_prefix)


def run_id() -> str:
    return f"job-{uuid.uuid4().hex[:6]}"


# --- in process -------------------------------------------------------------------------------

def test_status_prints_a_readable_table(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run, nodes=3)
    code, out, err = cli("status", run)
    assert (code, err) == (EXIT_OK, "")
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
    code, out, _ = cli("status", run, "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    assert data["run_id"] == run and data["key"] == f"{cli.key_prefix}/{run}"
    assert data["state"]["world_size"] == 2 and data["state"]["closed"] is False
    assert [node["rank"] for node in data["state"]["nodes"]] == [0, 1]


def test_status_of_a_missing_run_exits_3(cli: Cli) -> None:
    code, out, err = cli("status", "nope")
    assert (code, out) == (EXIT_NOT_FOUND, "")
    assert err.startswith("etcd-rdzv: No rendezvous state for run 'nope'")


def test_list(cli: Cli) -> None:
    code, out, _ = cli("list")
    assert code == EXIT_OK and "No runs under" in out
    seed(cli.endpoint, cli.key_prefix, "first", nodes=2, store_keys=2)
    seed(cli.endpoint, cli.key_prefix, "second", nodes=1, store_keys=0)
    code, out, _ = cli("list")
    lines = out.splitlines()
    assert code == EXIT_OK
    assert lines[0].split() == ["RUN", "ROUND", "STATE", "NODES", "REVISION", "SIZE", "STORE",
                                "KEYS", "IDLE", "EXPIRES", "IN"]
    assert lines[1].split()[:4] == ["first", "7", "complete", "2"]
    assert lines[2].split()[:4] == ["second", "7", "complete", "1"]
    code, out, _ = cli("list", "--json")
    assert [(run["run_id"], run["store_keys"]) for run in json.loads(out)] == \
        [("first", 2), ("second", 0)]


def test_close_then_status_shows_closed(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run)
    code, out, _ = cli("close", run)
    assert code == EXIT_OK and out.startswith(f"Closed run {run!r}")
    code, out, _ = cli("close", run)
    assert code == EXIT_OK and "already closed" in out
    _, out, _ = cli("status", run)
    assert re.search(r"^state\s+closed$", out, re.M)
    code, _, err = cli("close", "nope")
    assert code == EXIT_NOT_FOUND and "nothing to close" in err


def test_delete(cli: Cli) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run, store_keys=2)
    code, out, _ = cli("delete", run)
    assert (code, out.strip()) == (EXIT_OK, f"Deleted run {run!r}: 3 keys.")
    code, _, err = cli("delete", run)
    assert code == EXIT_NOT_FOUND and "has no keys" in err


def test_cleanup_deletes_only_runs_idle_long_enough(cli: Cli) -> None:
    # The idle time comes from the lease of the run's newest key, less one lease window (a
    # lease serves writes for ttl/10 s): a short ttl makes the window 1 s.
    seed(cli.endpoint, cli.key_prefix, "old", ttl=10)
    time.sleep(4)
    seed(cli.endpoint, cli.key_prefix, "new", ttl=10)

    code, out, _ = cli("cleanup")  # default: idle for an hour
    assert code == EXIT_OK and "No run idle for 60 min or more (2 runs)" in out
    code, out, _ = cli("cleanup", "--older-than", "1s", "--dry-run")
    assert code == EXIT_OK
    assert "Would delete 1 of 2 runs" in out and "  old  (2 keys, idle" in out
    assert "new" not in out
    code, out, err = cli("cleanup", "--older-than", "1s")
    assert code == EXIT_OK
    assert "Listing the runs" in err
    assert re.search(r"^\[1/1\] deleted old \(2 keys, idle [\d.]+ s\)$", out, re.M)
    assert "Deleted 1 run (2 keys)" in out
    _, out, _ = cli("list")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["new"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status"], "the following arguments are required: RUN_ID"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["cleanup", "--older-than", "2x"], "invalid duration '2x'"),
        (["status", "r", "--timeout", "0"],
         "The option read_timeout must be an integer of at least 1, got read_timeout='0'. "
         "(set by --timeout)"),
        (["status", "r", "--endpoints", "h:99999"],
         "The port number of the endpoint 'h:99999' in endpoint='h:99999' must be an integer "
         "between 1 and 65535. (set by --endpoints)"),
        (["status", "a/b"], "The run id must be a non-empty string without '/'"),
        (["status", "r", "--ca-cert", "/nonexistent.pem"],
         "The file given by ca_cert='/nonexistent.pem' does not exist or is not a regular "
         "file. (set by --ca-cert)"),
        (["status", "r", "--password-file", "/etc/hostname"],
         "A password was given (password_file or $ETCD_RDZV_PASSWORD) but no username"),
        (["list", "--key-prefix", "/"], "The option key_prefix must be a non-empty etcd key"),
    ],
)
def test_usage_errors_exit_2_with_the_options_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == "" and message in err and "Traceback" not in err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], command: str | None) -> None:
    assert main([*([command] if command else []), "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"usage: etcd-rdzv{' ' + command if command else ''}")
    assert "exit codes:" in out
    if command not in (None, "serve"):
        for flag in ("--endpoints", "--key-prefix", "--ca-cert", "--cert", "--key", "--user",
                     "--password-file", "--timeout"):
            assert flag in out


def test_an_unreachable_etcd_exits_4(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = main(["list", "--endpoints", f"127.0.0.1:{free_port()}", "--timeout", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_UNREACHABLE and "is unavailable" in err and "Gave up after 1 s" in err
    assert time.monotonic() - started < 10


def test_endpoints_come_from_the_environment(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_id()
    seed(cli.endpoint, cli.key_prefix, run)
    monkeypatch.setenv("ETCD_RDZV_ENDPOINTS", cli.endpoint)
    code, out, _ = cli("status", run, "--key-prefix", cli.key_prefix, connect=False)
    assert code == EXIT_OK and "participant" in out


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


def test_exit_codes_are_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    for code in EXIT_CODES:
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"exit code {code} undocumented"


# --- security flags -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        server.enable_auth("root-secret")
        server.add_user("alice", "alice-secret", "/jobs/")
        yield server


def test_user_and_password_file(
    auth_server: EtcdServer, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = auth_server.get_endpoint()
    seed(endpoint, "/jobs", "train", config={"username": "alice", "password": "alice-secret"})
    secret = tmp_path / "password"
    secret.write_text("alice-secret\n")
    base = ["--endpoints", endpoint, "--user", "alice"]

    assert main(["status", "train", "--key-prefix", "/jobs", *base,
                 "--password-file", str(secret)]) == EXIT_OK
    assert "participant" in capsys.readouterr().out

    monkeypatch.setenv("ETCD_RDZV_PASSWORD", "alice-secret")
    assert main(["list", "--key-prefix", "/jobs", *base]) == EXIT_OK
    assert "train" in capsys.readouterr().out

    # Outside alice's prefix: permission denied, exit 5.
    assert main(["list", "--key-prefix", "/other", *base]) == EXIT_AUTH
    assert "permission denied" in capsys.readouterr().err

    monkeypatch.setenv("ETCD_RDZV_PASSWORD", "wrong")
    assert main(["list", "--key-prefix", "/jobs", *base]) == EXIT_AUTH
    assert "rejected the credentials of user 'alice'" in capsys.readouterr().err

    monkeypatch.delenv("ETCD_RDZV_PASSWORD")
    assert main(["list", "--key-prefix", "/jobs", *base]) == EXIT_USAGE
    assert "password (password_file or $ETCD_RDZV_PASSWORD) is missing" in \
        capsys.readouterr().err


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificates:
    return make_certificates(tmp_path_factory.mktemp("cli-pki"))


def test_tls_flags(certs: TlsCertificates, capsys: pytest.CaptureFixture[str]) -> None:
    with EtcdServer(tls=certs, client_cert_auth=True) as server:
        endpoint = server.get_endpoint()
        tls: dict[str, Any] = {"protocol": "https", "ca_cert": certs.ca_cert,
                               "ssl_cert": certs.client_cert, "ssl_cert_key": certs.client_key}
        seed(endpoint, "/tls", "secure", config=tls)
        flags = ["--endpoints", endpoint, "--key-prefix", "/tls", "--ca-cert",
                 str(certs.ca_cert), "--cert", str(certs.client_cert), "--key",
                 str(certs.client_key)]
        # A certificate flag alone means https.
        assert main(["status", "secure", *flags]) == EXIT_OK
        assert "participant" in capsys.readouterr().out
        # Plaintext to a TLS port fails at once, saying what to set: exit 4.
        assert main(["status", "secure", "--endpoints", endpoint, "--timeout", "3"]) == \
            EXIT_UNREACHABLE
        assert "set protocol=https and ca_cert" in capsys.readouterr().err
        assert main(["status", "secure", *flags, "--protocol", "http"]) == EXIT_USAGE
        assert "needs protocol=https" in capsys.readouterr().err


# --- as processes -------------------------------------------------------------------------------

def console_script() -> str:
    script = Path(sys.executable).parent / "etcd-rdzv"
    found = str(script) if script.exists() else shutil.which("etcd-rdzv")
    assert found, "the etcd-rdzv console script is not installed (pip install -e .)"
    return found


class Lines:
    """A process's stdout, line by line, each read with a timeout."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        self._process, self._lines = process, queue.Queue[str]()
        threading.Thread(target=self._pump, args=(process.stdout,), daemon=True).start()

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


def test_as_a_module_and_as_the_console_script(etcd_server: EtcdServer, key_prefix: str) -> None:
    run = run_id()
    endpoint = etcd_server.get_endpoint()
    seed(endpoint, key_prefix, run, nodes=2)
    flags = ["--endpoints", endpoint, "--key-prefix", key_prefix]
    result = subprocess.run([sys.executable, "-m", "etcd_rdzv.cli", "status", run, *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_OK, result.stderr
    assert "2 participants" in result.stdout
    result = subprocess.run([console_script(), "status", "missing", *flags],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_NOT_FOUND
    assert result.stderr.startswith("etcd-rdzv: No rendezvous state") and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_watch_prints_changes_until_ctrl_c(etcd_server: EtcdServer, key_prefix: str) -> None:
    run = run_id()
    endpoint = etcd_server.get_endpoint()
    seed(endpoint, key_prefix, run, nodes=1)
    env = {**os.environ, "ETCD_RDZV_ENDPOINTS": endpoint}
    process = subprocess.Popen(
        [sys.executable, "-m", "etcd_rdzv.cli", "watch", run, "--key-prefix", key_prefix,
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = Lines(process)
    try:
        first = json.loads(lines.next())
        assert first["run_id"] == run and first["state"]["world_size"] == 1
        seed(endpoint, key_prefix, f"{run}-other")  # another run: not reported

        async def overwrite() -> int:
            cfg = EtcdConfig(endpoints=parse_endpoints(endpoint), read_timeout=10)
            async with EtcdClient(cfg) as client:
                backend = AsyncEtcdRendezvousBackend(client, run, key_prefix=key_prefix)
                current = await backend.get_state()
                assert current is not None
                result = await backend.set_state(torch_state(4), current[1])
                assert result is not None and result[2]
                return result[1]
        revision = asyncio.run(overwrite())
        second = json.loads(lines.next())
        assert second["revision"] == revision and second["state"]["world_size"] == 4
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == EXIT_OK
        assert process.stderr is not None and "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_until_a_signal_and_leave_nothing_behind(
    signum: signal.Signals, capsys: pytest.CaptureFixture[str]
) -> None:
    process = subprocess.Popen([console_script(), "serve"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines = Lines(process)
    try:
        banner = lines.next()
        match = re.match(r"etcd is serving on (\S+) \(started in [\d.]+ s, data in (\S+), ",
                         banner)
        assert match, banner
        endpoint, data_dir = match.groups()
        assert lines.next().strip() == f"export ETCD_RDZV_ENDPOINTS={endpoint}"
        assert etcd_processes_using(data_dir), "no etcd process found"

        # Use it: write a run, read it back through the CLI.
        seed(endpoint, "/served", "dev")
        assert main(["status", "dev", "--endpoints", endpoint, "--key-prefix", "/served"]) \
            == EXIT_OK
        assert "participant" in capsys.readouterr().out

        process.send_signal(signum)
        assert process.wait(30) == EXIT_OK
        assert process.stderr is not None and "Traceback" not in process.stderr.read()
        assert etcd_processes_using(data_dir) == []
        assert not Path(data_dir).exists()
        assert main(["list", "--endpoints", endpoint, "--timeout", "1"]) == EXIT_UNREACHABLE
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
