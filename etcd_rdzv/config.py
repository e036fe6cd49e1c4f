"""Configuration, parsed and validated once into frozen objects.

Every option reaches etcd_rdzv either as a Python value or as a string from
``torchrun --rdzv-conf key=value`` (torch's ``RendezvousParameters.config``). Both end in the
``__post_init__`` of :class:`EtcdConfig` or :class:`RendezvousConfig`, the one place that
checks each value and converts it to its type (``"30"`` becomes ``30.0``): one rule and one
message per option. :meth:`RendezvousConfig.from_options` only gathers torch's strings, reads
the files they name and refuses what must not be given (a password on the command line).
Nothing downstream validates again. An invalid value raises :class:`ValueError` naming the
option and the value as given.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_PORT",
    "PASSWORD_ENV_VAR",
    "Endpoint",
    "EtcdConfig",
    "RendezvousConfig",
    "parse_endpoints",
]

DEFAULT_PORT = 2379
DEFAULT_KEY_PREFIX = "/torch/elastic/rendezvous"
DEFAULT_TTL = 7200
DEFAULT_READ_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_REQUEST_TIMEOUT = 5.0
#: etcd's default ``--max-request-bytes`` (1.5 MiB).
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
DEFAULT_COMPRESS_THRESHOLD = 16 * 1024
#: The environment variable a password is read from when no ``password_file`` is given.
PASSWORD_ENV_VAR = "ETCD_RDZV_PASSWORD"

log = logging.getLogger(__name__)

#: The ``--rdzv-conf`` keys this library reads.
BACKEND_OPTIONS = frozenset({
    "read_timeout", "request_timeout", "connect_timeout", "protocol", "ca_cert", "ssl_cert",
    "ssl_cert_key", "username", "password_file", "key_prefix", "ttl", "compress_threshold",
    "max_request_bytes", "conflict_backoff", "wait", "compact_interval", "verify_state",
    "handler",
})
#: Options of the backend under torch's handler; the native handler has no use for them.
TORCH_HANDLER_OPTIONS = frozenset({
    "compress_threshold", "max_request_bytes", "conflict_backoff", "wait", "compact_interval",
    "verify_state",
})
#: Keys torch's handler and launcher read or add (torchrun adds ``rank`` and ``timeout``).
TORCH_OPTIONS = frozenset({
    "join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
    "keep_alive_interval", "keep_alive_max_attempt", "timeout", "rank", "is_host",
    "local_addr", "store_type", "use_libuv",
})

_HOST_PATTERN = re.compile(r"^[\w.-]+$")
_IPV6_PATTERN = re.compile(r"^[0-9A-Fa-f:.]+(%[\w.-]+)?$")


@dataclass(frozen=True)
class Endpoint:
    """One etcd member's client address."""

    host: str
    port: int = DEFAULT_PORT

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def _parse_one_endpoint(text: str, whole: str) -> Endpoint:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not _IPV6_PATTERN.match(host) or (rest and not rest.startswith(":")):
            raise ValueError(
                f"The endpoint {text!r} in endpoint={whole!r} is not a valid IPv6 endpoint; "
                "write it as [address]:port."
            )
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(
            f"The endpoint {text!r} in endpoint={whole!r} looks like a bare IPv6 address; "
            "write it as [address]:port."
        )
    else:
        host, sep, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if sep else None
        if not _HOST_PATTERN.match(host):
            raise ValueError(
                f"The hostname of the endpoint {text!r} in endpoint={whole!r} must be a "
                "dot-separated list of labels, an IPv4 address, or an IPv6 address in brackets."
            )
    if port_text is None:
        return Endpoint(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"The port number of the endpoint {text!r} in endpoint={whole!r} must be an "
            "integer between 1 and 65535."
        )
    return Endpoint(host, int(port_text))


def parse_endpoints(endpoint: str | None) -> tuple[Endpoint, ...]:
    """Parse ``host[:port]`` entries separated by commas; IPv6 as ``[addr]:port``.

    An empty or missing endpoint means ``localhost:2379``, as in torch. Duplicates are dropped.
    """
    whole = (endpoint or "").strip()
    if not whole:
        return (Endpoint("localhost", DEFAULT_PORT),)
    parsed: list[Endpoint] = []
    for text in whole.split(","):
        text = text.strip()
        if not text:
            raise ValueError(f"The endpoint list endpoint={whole!r} has an empty entry.")
        one = _parse_one_endpoint(text, whole)
        if one not in parsed:
            parsed.append(one)
    return tuple(parsed)


def _number(value: object) -> float:
    """``value`` as a float (a number, or a string as torchrun delivers it); NaN if it is
    neither, so that every range check below fails on it."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return math.nan


def seconds_between(name: str, value: object, low: float, high: float = math.inf, *,
                    low_open: bool = False, zero_means_off: bool = False) -> float:
    """The one rule for an option that is a number of seconds: finite, at least ``low``
    (above it with ``low_open``), at most ``high``; 0 also allowed with ``zero_means_off``.

    Raises:
        ValueError: naming the option, the value as given and the range.
    """
    number = _number(value)
    fits = math.isfinite(number) and (number > low if low_open else number >= low) \
        and number <= high
    if fits or (zero_means_off and number == 0):
        return number
    if zero_means_off:
        wanted = f"0 (off) or a number of seconds of at least {low:g}"
    elif low_open and low == 0 and high == math.inf:
        wanted = "a positive number of seconds"
    elif high == math.inf:
        wanted = f"a number of seconds of at least {low:g}"
    else:
        wanted = f"a number of seconds from {low:g} to {high:g}"
    raise ValueError(f"The option {name} must be {wanted}, got {name}={value!r}.")


def integer_at_least(name: str, value: object, minimum: int) -> int:
    """The one rule for an integer option (an int, or a decimal string)."""
    parsed: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        parsed = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        parsed = int(value)
    if parsed is None or parsed < minimum:
        raise ValueError(f"The option {name} must be an integer of at least {minimum}, "
                         f"got {name}={value!r}.")
    return parsed


def _read_timeout(value: object) -> float:
    """torch's ``etcd-v2`` rule and message for a string (a positive integer); any positive
    number of seconds from Python."""
    if isinstance(value, str):
        if not re.fullmatch(r"\s*\+?\d+\s*", value) or int(value) < 1:
            raise ValueError(f"The read timeout must be a positive integer. Got "
                             f"read_timeout={value!r}.")
        return float(int(value))
    return seconds_between("read_timeout", value, 0, low_open=True)


#: A conflict backoff above this would stall a rendezvous more than torch's own 1 s poll.
MAX_CONFLICT_BACKOFF = 1.0


def _readable_file(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"The option {name} must be a file path, got {name}={value!r}.")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ValueError(f"The file given by {name}={str(value)!r} does not exist or is not a "
                         "regular file.")
    if not os.access(path, os.R_OK):
        raise ValueError(f"The file given by {name}={str(value)!r} is not readable.")
    return path


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd: endpoints, security and deadlines.

    Timeouts, in seconds:

    * ``read_timeout``: the deadline of one whole operation (a ``get_state``, a ``set_state``,
      a store ``set``), retries included. Named after torch's ``etcd-v2`` option.
    * ``request_timeout``: the deadline of one RPC attempt within it, so that a hung member
      costs one attempt rather than the whole operation. Capped by what is left of
      ``read_timeout``.
    * ``connect_timeout``: how long :func:`create_backend` waits for etcd to answer before it
      reports the endpoints unreachable (at most ``read_timeout``).
    """

    endpoints: tuple[Endpoint, ...] = (Endpoint("localhost", DEFAULT_PORT),)
    protocol: Literal["http", "https"] = "http"
    ca_cert: Path | None = None
    ssl_cert: Path | None = None
    ssl_cert_key: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    read_timeout: float = DEFAULT_READ_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("The option endpoint must name at least one etcd endpoint.")
        protocol = self.protocol.lower() if isinstance(self.protocol, str) else self.protocol
        if protocol not in ("http", "https"):
            raise ValueError(f"The protocol must be HTTP or HTTPS. Got protocol={self.protocol!r}.")
        set_field = object.__setattr__  # frozen: normalized once, here
        set_field(self, "protocol", protocol)
        set_field(self, "read_timeout", _read_timeout(self.read_timeout))
        for name in ("request_timeout", "connect_timeout"):
            set_field(self, name, seconds_between(name, getattr(self, name), 0, low_open=True))
        if self.protocol == "http":
            for name in ("ca_cert", "ssl_cert", "ssl_cert_key"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"The option {name}={str(getattr(self, name))!r} needs protocol=https; "
                        "with protocol=http the connection would not be encrypted."
                    )
        if self.ssl_cert_key is not None and self.ssl_cert is None:
            raise ValueError(
                f"The option ssl_cert_key={str(self.ssl_cert_key)!r} needs ssl_cert as well."
            )
        if (self.username is None) != (self.password is None):
            missing = "password (password_file or $" + PASSWORD_ENV_VAR + ")" \
                if self.password is None else "username"
            raise ValueError(f"Authentication needs both a username and a password; "
                             f"{missing} is missing.")

    @property
    def targets(self) -> str:
        """The endpoints as written in messages: ``h1:2379,h2:2379``."""
        return ",".join(str(e) for e in self.endpoints)

    @property
    def probe_timeout(self) -> float:
        """How long a new connection waits for etcd's first answer: ``connect_timeout``, at
        most ``read_timeout``."""
        return min(self.connect_timeout, self.read_timeout)

    @property
    def uses_tls(self) -> bool:
        return self.protocol == "https"


@dataclass(frozen=True)
class RendezvousConfig:
    """Everything :func:`etcd_rdzv.elastic.create_backend` needs, parsed from its parameters."""

    etcd: EtcdConfig
    run_id: str
    key_prefix: str = DEFAULT_KEY_PREFIX
    ttl: int = DEFAULT_TTL
    compress_threshold: int = DEFAULT_COMPRESS_THRESHOLD
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    #: Upper bound, in seconds, of a random pause before a conflicted ``set_state`` returns
    #: (0: off). Spreads out agents that race for the same state.
    conflict_backoff: float = 0.0
    #: How torch's handler waits between polls: ``poll`` (torch's fixed 1 s sleep) or
    #: ``watch`` (wake on an etcd watch of the state; see docs/fast-handler.md).
    wait: Literal["poll", "watch"] = "poll"
    #: Seconds between compactions of etcd's history run by the backend after a write
    #: (0: off, the default). Compaction covers etcd's whole keyspace: leave it to etcd's
    #: ``--auto-compaction-retention`` when you run etcd; see docs/operations.md.
    compact_interval: float = 0.0
    #: Check every state read from etcd with a restricted unpickler before handing it to
    #: torch (see :mod:`etcd_rdzv.state`): a state that names anything but torch's state
    #: classes, datetime and builtin containers raises ``EtcdStateError``. Off by default.
    verify_state: bool = False
    #: Which rendezvous runs over etcd: ``torch`` (torch's ``DynamicRendezvousHandler`` on
    #: one pickled state, the default) or ``native`` (per-node leased keys, one seal per
    #: round: :mod:`etcd_rdzv.native`, docs/native.md).
    handler: Literal["torch", "native"] = "torch"

    @classmethod
    def from_options(
        cls, endpoint: str | None, run_id: str, options: Mapping[str, Any]
    ) -> RendezvousConfig:
        """Parse torch's ``RendezvousParameters`` (``endpoint``, ``run_id``, ``config``).

        Raises:
            ValueError: an option has an invalid value; the message names it and the value.
        """
        if "password" in options:
            raise ValueError(
                "The option password is not accepted: command lines are visible to every user "
                f"of the machine. Use password_file=PATH or the {PASSWORD_ENV_VAR} environment "
                "variable."
            )
        unknown = sorted(set(options) - BACKEND_OPTIONS - TORCH_OPTIONS)
        if unknown:
            # Not an error: torch passes every --rdzv-conf key to every backend.
            log.warning("Ignoring rendezvous options nobody reads: %s (etcd-v3 reads %s)",
                        ", ".join(unknown), ", ".join(sorted(BACKEND_OPTIONS)))

        if str(options.get("handler", "")).strip() == "native":
            unused = sorted(TORCH_HANDLER_OPTIONS & set(options))
            if unused:
                log.warning("Ignoring rendezvous options that only handler=torch reads: %s",
                            ", ".join(unused))

        def get(name: str) -> Any:
            value = options.get(name)
            if isinstance(value, str):
                value = value.strip()
                return value if value else None
            return value

        tls_files: dict[str, Any] = {
            name: _readable_file(name, get(name)) if get(name) is not None else None
            for name in ("ca_cert", "ssl_cert", "ssl_cert_key")
        }
        username = get("username")
        password: str | None = None
        password_file = get("password_file")
        if password_file is not None:
            password = _readable_file("password_file", password_file).read_text().rstrip("\r\n")
            if not password:
                raise ValueError(f"The file given by password_file={password_file!r} is empty.")
        elif username is not None:
            password = os.environ.get(PASSWORD_ENV_VAR) or None
        if password is not None and username is None:
            raise ValueError(f"A password was given (password_file or ${PASSWORD_ENV_VAR}) but "
                             "no username; set username=NAME.")
        # Values go in as given (strings from torchrun): __post_init__ checks and converts
        # each one, so that every rule and its message live in one place.
        etcd_options = {name: get(name) for name in
                        ("protocol", "read_timeout", "request_timeout", "connect_timeout")}
        etcd = EtcdConfig(
            endpoints=parse_endpoints(endpoint),
            username=username,
            password=password,
            **{name: value for name, value in etcd_options.items() if value is not None},
            **tls_files,
        )
        run_options = {name: get(name) for name in (
            "key_prefix", "ttl", "compress_threshold", "max_request_bytes", "conflict_backoff",
            "wait", "compact_interval", "verify_state", "handler")}
        return cls(etcd=etcd, run_id=run_id,
                   **{name: value for name, value in run_options.items() if value is not None})

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalized once, here
        set_field(self, "run_id", validate_run_id(self.run_id))
        set_field(self, "key_prefix", validate_key_prefix(self.key_prefix))
        set_field(self, "ttl", integer_at_least("ttl", self.ttl, 1))
        set_field(self, "compress_threshold",
                  integer_at_least("compress_threshold", self.compress_threshold, 0))
        set_field(self, "max_request_bytes",
                  integer_at_least("max_request_bytes", self.max_request_bytes, 4096))
        set_field(self, "conflict_backoff", seconds_between(
            "conflict_backoff", self.conflict_backoff, 0, MAX_CONFLICT_BACKOFF))
        set_field(self, "compact_interval", seconds_between(
            "compact_interval", self.compact_interval, 1, zero_means_off=True))
        set_field(self, "verify_state", parse_bool("verify_state", self.verify_state))
        if self.wait not in ("poll", "watch"):
            raise ValueError(f"The option wait must be 'poll' or 'watch', got wait={self.wait!r}.")
        if self.handler not in ("torch", "native"):
            raise ValueError(f"The option handler must be 'torch' or 'native', got "
                             f"handler={self.handler!r}.")


_TRUE_WORDS = frozenset({"1", "true", "t", "yes", "y"})
_FALSE_WORDS = frozenset({"0", "false", "f", "no", "n"})


def parse_bool(name: str, value: object) -> bool:
    """An option as a bool, with torch's words (``RendezvousParameters.get_as_bool``):
    1/true/t/yes/y and 0/false/f/no/n in any case, a bool, or the int 1 or 0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"The option {name} must be a boolean (1, true, t, yes, y or 0, false, f, "
                     f"no, n), got {name}={value!r}.")


def validate_run_id(run_id: object) -> str:
    """Return ``run_id``, or raise naming it: non-empty, and no ``/`` (a run's store keys live
    under ``<key_prefix>/<run_id>/store/``, so a slash could reach into another run)."""
    if not isinstance(run_id, str) or not run_id.strip() or "/" in run_id:
        raise ValueError(f"The run id must be a non-empty string without '/', got "
                         f"run_id={run_id!r}.")
    return run_id


def validate_key_prefix(key_prefix: object) -> str:
    """Return the prefix without a trailing slash, or raise naming the value."""
    if not isinstance(key_prefix, str) or not key_prefix.strip("/ ") or key_prefix != \
            key_prefix.strip() or "\x00" in key_prefix:
        raise ValueError(
            "The option key_prefix must be a non-empty etcd key path such as "
            f"{DEFAULT_KEY_PREFIX!r}, got key_prefix={key_prefix!r}."
        )
    return key_prefix.rstrip("/")
