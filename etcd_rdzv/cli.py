"""``etcd-rdzv``: inspect and manage rendezvous runs in etcd, or serve a development etcd.

Commands: ``serve``, ``status RUN_ID``, ``list``, ``watch RUN_ID``, ``close RUN_ID``,
``delete RUN_ID``, ``cleanup``. Every command but ``serve`` takes the connection flags
(``--endpoints``, ``--key-prefix``, ``--ca-cert``, ``--cert``, ``--key``, ``--user``,
``--password-file``, ``--protocol``, ``--timeout``), which mean what the options of
``create_backend`` mean and are parsed by the same code, so the errors read the same.

Policy:

* **One line, never a traceback.** An expected failure prints ``etcd-rdzv: <message>`` on
  stderr; the message names the flag and the value (and, for endpoints, whether they came
  from ``--endpoints``, ``$ETCD_RDZV_ENDPOINTS`` or the default).
* **Exit codes come from exception types** (:data:`_EXIT_CODE_OF_ERROR`), never from a
  message's text; every code is in :data:`EXIT_CODES` and docs/cli.md.
* **A person is waiting.** ``--timeout`` defaults to 10 s; a refused connection is said at
  once while the command keeps trying; a name that does not resolve fails at once.
* **Long-running commands** (``watch``, ``serve``) end on SIGINT or SIGTERM with exit 0,
  their client closed or their etcd stopped.
* **``serve`` is for development**: no authentication, no TLS, so it listens on loopback
  unless ``--expose`` says otherwise, on etcd's port 2379 when it is free.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from . import __version__
from .config import DEFAULT_KEY_PREFIX, DEFAULT_PORT, DEFAULT_TTL, Endpoint, RendezvousConfig
from .errors import (
    EtcdAuthError,
    EtcdRendezvousError,
    EtcdTLSError,
    NotATorchStateError,
    RunNotFoundError,
    TransientError,
    UnavailableError,
)
from .exporter import DEFAULT_QUOTA_BYTES
from .keys import RunKeys

__all__ = [
    "EXIT_AUTH",
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NOT_TORCH_STATE",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "main",
    "parse_duration",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_UNREACHABLE = 4
EXIT_AUTH = 5
EXIT_NOT_TORCH_STATE = 6
EXIT_INTERRUPTED = 130

#: Every exit code and what it means.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_ERROR: "an error: a state that cannot be decoded or is refused, etcd refusing a "
                "request (out of space, ...), etcd exiting under `serve`",
    EXIT_USAGE: "usage: an unknown command or flag, or an invalid value (the message names it)",
    EXIT_NOT_FOUND: "the run has no state and no native keys (status, close, delete)",
    EXIT_UNREACHABLE: "etcd did not answer within --timeout, or TLS is misconfigured",
    EXIT_AUTH: "etcd refused the credentials, or the user may not access the key prefix",
    EXIT_NOT_TORCH_STATE: "the run's state key holds something that is not a torch "
                          "rendezvous state (another program wrote it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C) during a command other than watch and serve",
}

#: The environment variable ``--endpoints`` defaults to.
ENDPOINTS_ENV_VAR = "ETCD_RDZV_ENDPOINTS"
#: The endpoint without ``--endpoints`` or ``$ETCD_RDZV_ENDPOINTS``: torch's default.
DEFAULT_ENDPOINT = f"localhost:{DEFAULT_PORT}"
#: The CLI's default ``--timeout``: shorter than the backend's 60 s, for a person waiting.
DEFAULT_CLI_TIMEOUT = 10
DEFAULT_OLDER_THAN = "1h"
DEFAULT_SERVE_HOST = "127.0.0.1"
#: Each backend option and the flag that sets it, to name the flag in error messages.
_FLAG_OF_OPTION = {
    "endpoint": "--endpoints",
    "key_prefix": "--key-prefix",
    "ca_cert": "--ca-cert",
    "ssl_cert_key": "--key",
    "ssl_cert": "--cert",
    "username": "--user",
    "password_file": "--password-file",
    "protocol": "--protocol",
    "read_timeout": "--timeout",
    "ttl": "--ttl",
    "run_id": "RUN_ID",
}
#: The exit code of each kind of error, the first match wins (subclasses before their bases).
_EXIT_CODE_OF_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (RunNotFoundError, EXIT_NOT_FOUND),
    (NotATorchStateError, EXIT_NOT_TORCH_STATE),
    (EtcdAuthError, EXIT_AUTH),
    (EtcdTLSError, EXIT_UNREACHABLE),
    (TransientError, EXIT_UNREACHABLE),
)


class _UsageError(Exception):
    """A command line that cannot run; exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


# --- durations and sizes --------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds from ``30s``, ``30m``, ``2h``, ``1d``, ``1h30m`` or a bare number of seconds.

    Raises:
        ValueError: ``text`` is none of those.
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    if value and re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", value):
        return sum(float(number) * _UNIT_SECONDS[unit]
                   for number, unit in _DURATION_PART.findall(value))
    raise ValueError(f"invalid duration {text!r}: use a number with s, m, h or d, such as "
                     "30m, 2h, 1d or 1h30m")


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen_arg(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: give [HOST]:PORT with a "
                                         "TCP port from 1 to 65535, such as :9400 or "
                                         "127.0.0.1:9400")
    return host.strip("[]"), int(port)


def _bytes_arg(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: give a number of bytes, "
                                         "such as 2147483648")
    return int(text)


def _port_arg(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: give a TCP port from 1 to "
                                         "65535, or 0 for any free port")
    return int(text)


def _human_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours = minutes / 60
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} d"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]],
           right: Sequence[int] = ()) -> str:
    """A plain-text table; columns whose index is in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _pairs(pairs: Sequence[tuple[str, object]]) -> str:
    """``name  value`` lines, the values aligned."""
    width = max(len(name) for name, _ in pairs)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in pairs)


# --- the parser -----------------------------------------------------------------------------

def _connection_flags() -> _Parser:
    flags = _Parser(add_help=False)
    group = flags.add_argument_group(
        "connection", "As the create_backend options of the same meaning (docs/configuration.md)."
    )
    group.add_argument("--endpoints", metavar="H:P[,H:P...]",
                       default=None,
                       help=f"etcd client endpoints, comma-separated (--rdzv-endpoint); default "
                            f"${ENDPOINTS_ENV_VAR}, else {DEFAULT_ENDPOINT}")
    group.add_argument("--key-prefix", metavar="PREFIX",
                       help=f"where the runs' keys live (key_prefix); default {DEFAULT_KEY_PREFIX}")
    group.add_argument("--protocol", choices=("http", "https"),
                       help="https: TLS (protocol); default https when a certificate flag is "
                            "given, else http")
    group.add_argument("--ca-cert", metavar="PEM", help="CA of etcd's certificates (ca_cert)")
    group.add_argument("--cert", metavar="PEM", help="client certificate for mutual TLS (ssl_cert)")
    group.add_argument("--key", metavar="PEM", help="private key of --cert (ssl_cert_key)")
    group.add_argument("--user", metavar="NAME", help="etcd user (username); the password comes "
                       "from --password-file or $ETCD_RDZV_PASSWORD")
    group.add_argument("--password-file", metavar="PATH", help="file holding the password "
                       "(password_file)")
    group.add_argument("--timeout", metavar="SECONDS", default=str(DEFAULT_CLI_TIMEOUT),
                       help=f"deadline of each etcd operation, retries included (read_timeout); "
                            f"default {DEFAULT_CLI_TIMEOUT}")
    return flags


def _build_parser() -> _Parser:
    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in
                                         EXIT_CODES.items())
    parser = _Parser(
        prog="etcd-rdzv",
        description=textwrap.fill("Inspect and manage torch rendezvous runs kept in etcd by "
                                  "the etcd-v3 backend (handler=torch or handler=native), or "
                                  "serve a local development etcd.", 88),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"etcd-rdzv {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    connection = _connection_flags()

    def command(name: str, summary: str, description: str,
                with_connection: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=summary, description=textwrap.fill(description, 88),
            epilog="exit codes: see etcd-rdzv --help",
            parents=[connection] if with_connection else [],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sub

    serve = command("serve", "run a local development etcd until Ctrl-C",
                    "Start one etcd member on loopback with temporary data (etcd_rdzv.testing."
                    "EtcdServer), print its endpoint, and serve until Ctrl-C or SIGTERM; then "
                    "stop etcd and remove its data. No authentication, no TLS: for development "
                    "and demos, not production.",
                    with_connection=False)
    serve.add_argument("--host", default=DEFAULT_SERVE_HOST, metavar="ADDRESS",
                       help=f"the IP address to listen on (default {DEFAULT_SERVE_HOST}); one "
                            "that is not loopback needs --expose")
    serve.add_argument("--port", type=_port_arg, default=None, metavar="PORT",
                       help=f"the client port (default {DEFAULT_PORT}, or a free port when "
                            f"{DEFAULT_PORT} is taken; 0: any free port)")
    serve.add_argument("--expose", action="store_true",
                       help="allow a --host that is not loopback: whoever reaches it can read, "
                            "change and delete every key, as there is no authentication and "
                            "no TLS")

    status = command("status", "show a run's state",
                     "Show a run's rendezvous: round, whether it is complete or closed, and "
                     "each node with its role and rank; for handler=torch, each node's last "
                     "heartbeat; for handler=native, when each node joined, when the round "
                     "was sealed, and each node's lease time left.")
    status.add_argument("run_id", metavar="RUN_ID", help="the run id (--rdzv-id)")
    status.add_argument("--json", action="store_true", help="print JSON")

    listing = command("list", "list the runs under the key prefix",
                      "List every run under the key prefix with its handler, round, state, "
                      "world size, nodes alive (handler=native), revision, size, store keys, "
                      "the least time since its last write (by etcd's lease clock, exact to "
                      "within one lease window, ttl/10; 0 for a native run while any node "
                      "holds its lease) and the time left before its keys expire.")
    listing.add_argument("--json", action="store_true", help="print JSON")

    watch = command("watch", "follow a run's state until Ctrl-C",
                    "Print the run's state, then one line per change, until Ctrl-C: each write "
                    "of the state (handler=torch); each join, leave, seal, waiting marker "
                    "and close (handler=native). The watch resumes by itself after etcd "
                    "failures.")
    watch.add_argument("run_id", metavar="RUN_ID", help="the run id (--rdzv-id)")
    watch.add_argument("--json", action="store_true", help="print one JSON object per change")

    close = command("close", "close a run (as torch's set_closed does)",
                    "Mark the run's rendezvous closed, as the handler's set_closed() does "
                    "when a job ends: agents see it on their next read of the state (at once "
                    "under handler=native); a node that joins or re-joins gets "
                    "RendezvousClosedError instead of waiting for a new round. Running workers "
                    "are not interrupted.")
    close.add_argument("run_id", metavar="RUN_ID", help="the run id (--rdzv-id)")
    close.add_argument("--ttl", metavar="SECONDS",
                       help=f"how long the closed state outlives this write (ttl; under "
                            f"handler=native, the run lease's if the run has none); default "
                            f"{DEFAULT_TTL}")

    delete = command("delete", "delete a run's keys",
                     "Delete every key of the run (its state or native keys, and its store "
                     "keys), in one transaction. Agents still running would start a new "
                     "rendezvous; close the run first.")
    delete.add_argument("run_id", metavar="RUN_ID", help="the run id (--rdzv-id)")

    cleanup = command("cleanup", "delete runs idle for a while",
                      "Delete every run whose last write (state or store) is older than "
                      "--older-than, measured by etcd's lease clock. A run written to after "
                      "the listing is kept, and so is a native run while any node holds its "
                      "lease. Runs of unknown age (keys without a lease) are never deleted.")
    cleanup.add_argument("--older-than", type=_duration_arg, default=DEFAULT_OLDER_THAN,
                         metavar="DURATION",
                         help=f"idle time, such as 30m, 2h or 1d (default {DEFAULT_OLDER_THAN})")
    cleanup.add_argument("--dry-run", action="store_true",
                         help="show what would be deleted, delete nothing")

    exporter = command("exporter", "serve Prometheus metrics of every run until Ctrl-C",
                       "Serve /metrics for Prometheus: each run under the key prefix (nodes "
                       "by role, round, world size, complete, closed, the oldest heartbeat, "
                       "the state's size) and etcd (database size against its quota, the "
                       "NOSPACE alarm). One etcd read per scrape for every run; when etcd "
                       "does not answer, etcd_rdzv_up is 0. Needs prometheus_client "
                       "(pip install 'etcd-rdzv[exporter]'). Metrics and alert rules: "
                       "docs/operations.md.")
    exporter.add_argument("--listen", metavar="[HOST]:PORT", type=_listen_arg,
                          default=_listen_arg(":9400"),
                          help="where to serve; no host: every interface (default :9400)")
    exporter.add_argument("--scrape-timeout", metavar="DURATION", type=_duration_arg,
                          default=10.0, help="the deadline of one scrape (default 10s)")
    exporter.add_argument("--quota-bytes", metavar="BYTES", type=_bytes_arg,
                          default=DEFAULT_QUOTA_BYTES,
                          help="etcd's --quota-backend-bytes, which etcd does not report "
                               f"(default {DEFAULT_QUOTA_BYTES}, etcd's default)")
    return parser


# --- running commands -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Endpoints:
    """The endpoints to use, and where they came from, for the messages."""

    value: str
    origin: str
    """``--endpoints``, ``$ETCD_RDZV_ENDPOINTS`` or ``default``."""

    @classmethod
    def of(cls, args: argparse.Namespace) -> _Endpoints:
        """From ``--endpoints``, else the environment, else the default; empty is an error."""
        env = os.environ.get(ENDPOINTS_ENV_VAR)
        if args.endpoints is not None:
            if not args.endpoints.strip():
                raise _UsageError(
                    f"etcd-rdzv: --endpoints {args.endpoints!r} is empty: give H:P[,H:P...], or "
                    f"leave it out to use ${ENDPOINTS_ENV_VAR} "
                    + (f"({env!r})" if env is not None else f"(unset; else {DEFAULT_ENDPOINT})"))
            return cls(args.endpoints, "--endpoints")
        if env is not None:
            if not env.strip():
                raise _UsageError(
                    f"etcd-rdzv: ${ENDPOINTS_ENV_VAR} is set but empty ({env!r}): set it to "
                    f"H:P[,H:P...], unset it for {DEFAULT_ENDPOINT}, or give --endpoints")
            return cls(env, f"${ENDPOINTS_ENV_VAR}")
        return cls(DEFAULT_ENDPOINT, "default")

    def __str__(self) -> str:
        """The endpoints, where they came from and how to change them, for a message."""
        if self.origin == "default":
            return (f"endpoints {self.value} (the default: neither --endpoints nor "
                    f"${ENDPOINTS_ENV_VAR} is set; set one, or start a development etcd with "
                    "`etcd-rdzv serve`)")
        return f"endpoints {self.value} (from {self.origin})"


def _config(args: argparse.Namespace, run_id: str | None) -> RendezvousConfig:
    tls = args.ca_cert or args.cert or args.key
    options = {
        "key_prefix": args.key_prefix,
        "protocol": args.protocol or ("https" if tls else None),
        "ca_cert": args.ca_cert,
        "ssl_cert": args.cert,
        "ssl_cert_key": args.key,
        "username": args.user,
        "password_file": args.password_file,
        "read_timeout": args.timeout,
        "ttl": getattr(args, "ttl", None),
    }
    try:
        # list and cleanup name no run; any valid id serves.
        return RendezvousConfig.from_options(
            args.endpoints_given.value, run_id if run_id is not None else "-",
            {name: value for name, value in options.items() if value is not None},
        )
    except ValueError as exc:
        message = str(exc)
        flag_of_option = {**_FLAG_OF_OPTION, "endpoint": args.endpoints_given.origin}
        flags = [flag for option, flag in flag_of_option.items()
                 if re.search(rf"\b{option}[=' ]", message) and flag not in message]
        hint = f" (set by {' and '.join(dict.fromkeys(flags))})" if flags else ""
        raise _UsageError(f"etcd-rdzv: {message}{hint}") from None


def _admin_call(args: argparse.Namespace, run_id: str | None,
                body: Callable[[Any, RendezvousConfig], Awaitable[int]]) -> int:
    """Run ``body(admin, config)`` in a fresh event loop with a client that is closed after.

    Beside it, :func:`_probe_endpoints` tells the person at once about an endpoint that
    refuses connections or does not resolve. A long-running command (:data:`_UNTIL_SIGNAL`)
    is cancelled by SIGINT or SIGTERM and then exits 0, its client closed.
    """
    config = _config(args, run_id)
    given: _Endpoints = args.endpoints_given

    async def run() -> int:
        from ._connection import EtcdClient
        from .admin import RendezvousAdmin

        task = asyncio.current_task()
        assert task is not None
        stopped_by: list[int] = []
        if args.command in _UNTIL_SIGNAL:
            def stop(signum: int) -> None:
                stopped_by.append(signum)
                task.cancel()

            for signum in _STOP_SIGNALS:
                asyncio.get_running_loop().add_signal_handler(signum, stop, signum)
        failed: list[EtcdRendezvousError] = []

        async def probe() -> None:
            until = "Ctrl-C" if args.command in _UNTIL_SIGNAL else \
                f"--timeout ({config.etcd.read_timeout:g} s)"
            try:
                await _probe_endpoints(config.etcd.endpoints, given, until)
            except EtcdRendezvousError as exc:
                failed.append(exc)
                task.cancel()

        probing = asyncio.create_task(probe())
        try:
            async with EtcdClient(config.etcd) as client:
                admin = RendezvousAdmin(client, config.key_prefix, ttl=config.ttl)
                return await body(admin, config)
        except TransientError as exc:
            raise type(exc)(f"{exc} Using the {given}.") from exc
        except asyncio.CancelledError:
            if failed:
                raise failed[0] from None
            if stopped_by:
                return EXIT_OK
            raise
        finally:
            probing.cancel()

    return asyncio.run(run())


async def _probe_endpoints(endpoints: Sequence[Endpoint], given: _Endpoints, until: str) -> None:
    """Say at once what the client would only report at its deadline.

    An endpoint whose every address refuses the connection gets one line on stderr, and the
    command goes on trying (etcd may be starting). When no endpoint resolves, raises
    :class:`UnavailableError`: a person is waiting, so a failing resolver fails at once.
    """
    loop = asyncio.get_running_loop()
    refused: list[str] = []
    unresolved: list[str] = []
    for endpoint in endpoints:
        try:
            addresses = await loop.getaddrinfo(endpoint.host, endpoint.port,
                                               type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            unresolved.append(f"{endpoint} does not resolve ({exc.strerror})")
            continue
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as sock:
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, address)
                except ConnectionRefusedError:
                    continue
                except OSError:
                    return  # unreachable some other way: the client's error will say how
                return  # something listens
        refused.append(str(endpoint))
    if not refused:
        raise UnavailableError(f"The etcd endpoint {'; '.join(unresolved)}. Using the {given}.")
    also = "".join(f"; {text}" for text in unresolved)
    _print(f"etcd-rdzv: nothing listens at {', '.join(refused)} yet (connection refused{also}); "
           f"trying until {until}. Using the {given}.", file=sys.stderr)


def _print(text: str = "", file: IO[str] | None = None) -> None:
    print(text, file=file or sys.stdout, flush=True)


def _state_word(state: Any) -> str:
    if state.closed:
        return "closed"
    return "complete" if state.complete else "joining"


async def _status(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    snapshot = await admin.snapshot(args.run_id)
    key = admin.state_key(args.run_id).decode()
    if snapshot.state is None:
        native = await admin.native_status(args.run_id)
        if native is None:
            raise RunNotFoundError(f"No rendezvous state and no native keys for run "
                                   f"{args.run_id!r} under {config.key_prefix!r} (key "
                                   f"{key!r}).")
        return _native_status(args, native, config)
    state = snapshot.state
    now = datetime.datetime.now(datetime.timezone.utc)
    if args.json:
        _print(json.dumps({
            "run_id": args.run_id, "handler": "torch", "key": key,
            "revision": snapshot.revision, "stored_bytes": snapshot.stored_bytes,
            "lease": snapshot.lease, "state": state.to_dict(now),
        }, indent=2))
        return EXIT_OK
    deadline = "none"
    if state.deadline is not None:
        left = (state.deadline - now).total_seconds()
        deadline = f"{state.deadline.isoformat(timespec='seconds')} (" + (
            f"in {_human_seconds(left)})" if left >= 0 else f"{_human_seconds(-left)} ago)")
    _print(_pairs([
        ("run", args.run_id),
        ("handler", "torch"),
        ("key", f"{key} (revision {snapshot.revision}, {_human_bytes(snapshot.stored_bytes)} "
                "stored)"),
        ("round", state.round),
        ("state", _state_word(state)),
        ("deadline", deadline),
        ("nodes", f"{_count(state.world_size, 'participant')}, {len(state.wait_list)} waiting, "
                  f"{len(state.redundancy_list)} redundant"),
    ]))
    ages = state.heartbeat_ages(now)
    rows = []
    for node in state.nodes:
        rank = state.participants.get(node)
        age = ages.get(node)
        rows.append((str(node), state.role(node), "-" if rank is None else rank,
                     "-" if age is None else f"{_human_seconds(age.total_seconds())} ago"))
    if rows:
        _print()
        _print(_table(("NODE", "ROLE", "RANK", "LAST HEARTBEAT"), rows, right=(2,)))
    return EXIT_OK


def _clock(unix_time: float, *, date: bool = False) -> str:
    """A node's time stamp in local time, to the millisecond; with the date when asked or
    when it is not today."""
    moment = datetime.datetime.fromtimestamp(unix_time)
    if date or moment.date() != datetime.date.today():
        return moment.isoformat(sep=" ", timespec="milliseconds")
    return moment.time().isoformat(timespec="milliseconds")


def _native_nodes(view: Any) -> str:
    """A native run's nodes in words: members, waiting, standbys, and the rarer roles when
    there are any."""
    counts = view.counts
    words = [_count(counts["member"], "member"), f"{counts['waiting']} waiting",
             _count(counts["standby"], "standby")]
    words += [f"{counts[role]} {role}" for role in ("gone", "joining", "late", "stale")
              if counts[role]]
    return ", ".join(words)


def _native_round(view: Any) -> str:
    seal = view.seal
    if seal is None:
        return "none sealed yet"
    ago = time.time() - seal.sealed_at
    text = (f"{seal.round} ({_count(seal.size, 'node')}), sealed "
            f"{_clock(seal.sealed_at, date=True)} ({_human_seconds(max(0.0, ago))} ago) by "
            f"{seal.sealer}")
    if view.round_seconds is not None:
        text += f", {_round_took(view.round_seconds)} after its first node joined"
    return text


def _round_took(seconds: float) -> str:
    """A round's duration: to the millisecond, as rounds often take less than a second."""
    return f"{max(0.0, seconds):.3f} s" if seconds < 10 else _human_seconds(seconds)


def _lease_left(seconds: int) -> str:
    """etcd's whole seconds left on a lease."""
    return f"{seconds} s" if seconds < 120 else _human_seconds(seconds)


def _native_state(view: Any) -> str:
    if view.closed and view.closed_by:
        return f"closed (by {view.closed_by})"
    return str(view.state)


def _native_status(args: argparse.Namespace, view: Any, config: RendezvousConfig) -> int:
    prefix = RunKeys(args.run_id, config.key_prefix).native_prefix.decode()
    if args.json:
        _print(json.dumps({"run_id": args.run_id, "handler": "native", "key": prefix,
                           "revision": view.revision, "native": view.to_dict()}, indent=2))
        return EXIT_OK
    lease = "none" if not view.run_lease else (
        f"{view.run_lease:x}, "
        + ("gone" if view.run_lease_ttl_left is None else
           f"{_lease_left(view.run_lease_ttl_left)} left")
        + " (renewed by the nodes; the run's keys expire ttl after the last node left)")
    _print(_pairs([
        ("run", args.run_id),
        ("handler", "native"),
        ("keys", f"{prefix} (revision {view.revision})"),
        ("round", _native_round(view)),
        ("state", _native_state(view)),
        ("nodes", _native_nodes(view)),
        ("run lease", lease),
    ]))
    rows = [(node.node, node.role, node.round, "-" if node.rank is None else node.rank,
             "-" if node.joined_at is None else _clock(node.joined_at),
             "-" if node.lease_ttl_left is None else _lease_left(node.lease_ttl_left))
            for node in view.nodes]
    if rows:
        _print()
        _print(_table(("NODE", "ROLE", "ROUND", "RANK", "JOINED", "LEASE LEFT"), rows,
                      right=(2, 3, 5)))
    if not view.ranks_known:
        _print(f"etcd-rdzv: the roster of round {view.round} is no longer in etcd's history "
               "(compacted) and members left since: ranks unknown.", file=sys.stderr)
    return EXIT_OK


async def _list(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    runs = await admin.list_runs()
    if args.json:
        _print(json.dumps([run.to_dict() for run in runs], indent=2))
        return EXIT_OK
    if not runs:
        _print(f"No runs under {config.key_prefix!r}.")
        return EXIT_OK
    rows = []
    for run in runs:
        state, native = run.state, run.native
        if state is not None:
            word, round_, world, alive = \
                _state_word(state), state.round, state.world_size, "-"
        elif native is not None:
            word, world, alive = native.state, native.world_size, native.nodes_alive
            round_ = "-" if native.round is None else native.round
        else:
            word = ("not torch" if run.not_a_torch_state else "unreadable") if run.error \
                else "no state"
            round_, world, alive = "-", "-", "-"
        rows.append((
            run.run_id,
            run.handler or "-",
            round_,
            word,
            world,
            alive,
            run.revision if run.revision is not None else "-",
            _human_bytes(run.state_bytes) if run.revision is not None else "-",
            run.store_keys,
            "?" if run.idle_seconds is None else _human_seconds(run.idle_seconds),
            "?" if run.ttl_left is None else _human_seconds(run.ttl_left),
        ))
    _print(_table(("RUN", "HANDLER", "ROUND", "STATE", "NODES", "ALIVE", "REVISION", "SIZE",
                   "STORE KEYS", "IDLE AT LEAST", "EXPIRES IN"), rows,
                  right=(2, 4, 5, 6, 7, 8, 9, 10)))
    for run in runs:
        if run.error:
            _print(f"etcd-rdzv: run {run.run_id!r}: {run.error}", file=sys.stderr)
    return EXIT_OK


def _watch_line(snapshot: Any) -> str:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    state = snapshot.state
    if state is None:
        return f"{stamp}  revision {snapshot.revision}  no state (not created yet, or deleted)"
    ranks = sorted(state.participants.values())
    span = f" (ranks {ranks[0]}-{ranks[-1]})" if len(ranks) > 1 else (
        f" (rank {ranks[0]})" if ranks else "")
    return (f"{stamp}  revision {snapshot.revision}  round {state.round}  "
            f"{_state_word(state)}  {_count(state.world_size, 'participant')}{span}, "
            f"{len(state.wait_list)} waiting, {len(state.redundancy_list)} redundant")


def _native_change(event: Any) -> str:
    """What a native event says happened, in words."""
    view = event.view
    if event.change == "status":
        return ""
    if event.change in ("joined", "left"):
        return f"{event.node} {event.change} round {event.round}"
    if event.change == "sealed":
        text = f"round {event.round} sealed with {_count(view.world_size, 'node')}"
        if view.seal is not None and view.seal.round == event.round:
            text += f" by {view.seal.sealer}"
            if view.round_seconds is not None:
                text += f", {_round_took(view.round_seconds)} after its first join"
        return text
    if event.change == "waiting":
        return f"nodes wait for round {event.round}: the members restart to admit them"
    if event.change == "closed":
        return f"closed by {view.closed_by}"
    return "the closed key went away"


def _native_watch_line(event: Any) -> str:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    view = event.view
    round_ = "-" if view.round is None else view.round
    change = _native_change(event)
    return (f"{stamp}  revision {event.revision}  round {round_}  {view.state}  "
            f"{_native_nodes(view)}" + (f"  ({change})" if change else ""))


async def _watch(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    from .admin import NativeEvent

    async with aclosing(admin.watch_run(args.run_id)) as changes:
        async for change in changes:
            native = isinstance(change, NativeEvent)
            if args.json:
                _print(json.dumps(change.to_dict() if native else {
                    "run_id": args.run_id, "revision": change.revision,
                    "handler": None if change.state is None else "torch",
                    "state": None if change.state is None else change.state.to_dict(),
                }))
            else:
                _print(_native_watch_line(change) if native else _watch_line(change))
    return EXIT_OK


async def _close(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    if await admin.close_run(args.run_id):
        _print(f"Closed run {args.run_id!r}: no node may join or re-join it any more "
               "(running workers are not interrupted).")
    else:
        _print(f"Run {args.run_id!r} was already closed.")
    return EXIT_OK


async def _delete(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    deleted = await admin.delete_run(args.run_id)
    if not deleted:
        raise RunNotFoundError(f"Run {args.run_id!r} has no keys under {config.key_prefix!r}.")
    _print(f"Deleted run {args.run_id!r}: {_count(deleted, 'key')}.")
    return EXIT_OK


async def _cleanup(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    older_than = args.older_than
    _print(f"Listing the runs under {config.key_prefix!r}...", file=sys.stderr)
    runs = await admin.list_runs()
    stale = [run for run in runs if run.idle_seconds is not None
             and run.idle_seconds >= older_than]
    unknown = [run for run in runs if run.idle_seconds is None]
    limit = _human_seconds(older_than)
    note = f"; {len(unknown)} of unknown age kept" if unknown else ""
    if not stale:
        _print(f"No run idle for {limit} or more ({_count(len(runs), 'run')}{note}).")
        return EXIT_OK
    if args.dry_run:
        _print(f"Would delete {len(stale)} of {_count(len(runs), 'run')} (idle for {limit} "
               f"or more{note}):")
        for run in stale:
            keys = int(run.revision is not None) + run.store_keys + run.native_keys
            _print(f"  {run.run_id}  ({_count(keys, 'key')}, idle "
                   f"{_human_seconds(run.idle_seconds)})")
        return EXIT_OK
    total_keys = deleted_runs = 0
    width = len(str(len(stale)))
    for index, run in enumerate(stale, 1):
        deleted = await admin.delete_run(run.run_id, unchanged_since=run.last_revision)
        progress = f"[{index:>{width}}/{len(stale)}]"
        if deleted is None:
            _print(f"{progress} kept {run.run_id}: written to since the listing")
            continue
        deleted_runs += 1
        total_keys += deleted
        _print(f"{progress} deleted {run.run_id} ({_count(deleted, 'key')}, idle "
               f"{_human_seconds(run.idle_seconds)})")
    _print(f"Deleted {_count(deleted_runs, 'run')} ({_count(total_keys, 'key')}) idle for "
           f"{limit} or more{note}.")
    return EXIT_OK


# --- serve ----------------------------------------------------------------------------------

def _serve_host(args: argparse.Namespace) -> str:
    """``--host``, checked: an IP address of this machine; loopback unless ``--expose``."""
    try:
        address = ipaddress.ip_address(args.host)
    except ValueError:
        raise _UsageError(f"etcd-rdzv serve: --host {args.host!r} is not an IP address (etcd "
                          f"listens on addresses, not names); give one such as "
                          f"{DEFAULT_SERVE_HOST} or ::1") from None
    try:
        with socket.socket(socket.AF_INET6 if address.version == 6 else socket.AF_INET) as sock:
            sock.bind((str(address), 0))
    except OSError as exc:
        raise _UsageError(f"etcd-rdzv serve: --host {args.host} is not an address of this "
                          f"machine ({exc.strerror}); leave --host out for "
                          f"{DEFAULT_SERVE_HOST}") from None
    if not address.is_loopback and not args.expose:
        where = "every network of this machine" if address.is_unspecified else \
            f"the network of {address}"
        raise _UsageError(f"etcd-rdzv serve: --host {args.host} would serve etcd to {where}, "
                          "with no authentication and no TLS; add --expose to do that anyway, "
                          f"or leave --host out for {DEFAULT_SERVE_HOST}")
    return str(address)



def _serve(args: argparse.Namespace) -> int:
    from .errors import EtcdStartError
    from .testing import EtcdServer, port_is_free

    host = _serve_host(args)
    port = args.port
    if port is None:
        port = DEFAULT_PORT if port_is_free(host, DEFAULT_PORT) else 0
        if not port:
            _print(f"etcd-rdzv: port {DEFAULT_PORT} is taken on {host} (another etcd?); "
                   "serving on a free port instead (--port chooses one).", file=sys.stderr)
    elif port and not port_is_free(host, port):
        _print(f"etcd-rdzv: --port {port} is taken on {host}: stop what listens there, or "
               "give another --port (0: any free port).", file=sys.stderr)
        return EXIT_ERROR
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in _STOP_SIGNALS}
    server = EtcdServer(host=host, client_port=port)
    try:
        started = time.monotonic()
        try:
            server.start()
        except (EtcdStartError, OSError) as exc:
            _print(f"etcd-rdzv: etcd did not start: {exc}", file=sys.stderr)
            return EXIT_ERROR
        endpoint = server.get_endpoint()
        if args.expose and not ipaddress.ip_address(host).is_loopback:
            _print(f"etcd-rdzv: WARNING: etcd serves {endpoint} without authentication and "
                   f"without TLS: whoever reaches port {server.get_port()} of this machine can "
                   "read, change and delete every key.", file=sys.stderr)
        _print(f"etcd is serving on {endpoint} (started in {time.monotonic() - started:.1f} s, "
               f"data in {server.member.data_dir}, removed on exit). Ctrl-C stops it.")
        _print(f"export {ENDPOINTS_ENV_VAR}={endpoint}")
        _print(f"torchrun --rdzv-backend=etcd-v3 --rdzv-endpoint={endpoint} --rdzv-id=RUN ...")
        while not stop.wait(0.5):
            if not server.member.running:
                _print(f"etcd-rdzv: etcd exited unexpectedly:\n{server.log_tail()}",
                       file=sys.stderr)
                return EXIT_ERROR
        _print("Stopping etcd.", file=sys.stderr)
        return EXIT_OK
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --- main -----------------------------------------------------------------------------------

#: Commands that run until a signal; SIGINT or SIGTERM ends them with exit code 0.
_UNTIL_SIGNAL = frozenset({"watch", "serve", "exporter"})
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def _exporter(args: argparse.Namespace, admin: Any, config: RendezvousConfig) -> int:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise _UsageError("etcd-rdzv exporter needs prometheus_client: pip install "
                          "'etcd-rdzv[exporter]'") from None
    from .exporter import RendezvousCollector

    registry = CollectorRegistry()
    registry.register(RendezvousCollector(
        admin, asyncio.get_running_loop(), scrape_timeout=args.scrape_timeout,
        quota_bytes=args.quota_bytes))
    host, port = args.listen
    try:
        server, _ = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    except OSError as exc:
        _print(f"etcd-rdzv: cannot listen on --listen={host}:{port}: {exc.strerror}",
               file=sys.stderr)
        return EXIT_ERROR
    _print(f"Serving the metrics of the runs under {config.key_prefix!r} on "
           f"http://{host or '0.0.0.0'}:{port}/metrics until Ctrl-C.", file=sys.stderr)
    try:
        await asyncio.Event().wait()
    finally:
        server.shutdown()
        server.server_close()
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace, Any, RendezvousConfig], Awaitable[int]]] = {
    "status": _status,
    "list": _list,
    "watch": _watch,
    "close": _close,
    "delete": _delete,
    "cleanup": _cleanup,
    "exporter": _exporter,
}


def _exit_code(exc: BaseException) -> int:
    return next((code for kind, code in _EXIT_CODE_OF_ERROR if isinstance(exc, kind)),
                EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``etcd-rdzv`` command line; return the exit code."""
    # gRPC's core logs a failed TLS handshake to stderr at info level, beside our one line.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    library_log = logging.getLogger(__package__)
    if not library_log.handlers:  # its warnings in our format, not logging's last resort
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("etcd-rdzv: warning: %(message)s"))
        library_log.addHandler(handler)
    parser = _build_parser()
    command = None
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        command = args.command
        if command in _UNTIL_SIGNAL:
            # Until the command installs its own handlers: SIGTERM as Ctrl-C.
            signal.signal(signal.SIGTERM, _interrupt)
        if command == "serve":
            return _serve(args)
        args.endpoints_given = _Endpoints.of(args)
        body = _COMMANDS[command]
        return _admin_call(args, getattr(args, "run_id", None),
                           lambda admin, config: body(args, admin, config))
    except _UsageError as exc:
        _print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except EtcdRendezvousError as exc:
        _print(f"etcd-rdzv: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_OK if command in _UNTIL_SIGNAL else EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`etcd-rdzv watch RUN | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
