"""The key layout: every etcd key etcd_rdzv reads or writes is named here, and only here.

Under one ``key_prefix`` (default ``/torch/elastic/rendezvous``, torch's ``etcd-v2`` key)::

    <key_prefix>/<run_id>                 the state torch's handler writes (handler=torch)
    <key_prefix>/<run_id>/store/<key>     the run's key-value store (torch's Store)
    <key_prefix>/<run_id>/native/...      the native rendezvous's keys (handler=native):
        ctl/lease                         the run lease's id (renewed by every node)
        ctl/closed                        the run is closed
        ctl/seal/<round>                  round <round> is sealed: cutoff revision, size
        ctl/wait/<round>                  a node waits for <round> (under its own lease)
        round/<round>/<node>              node <node> joined round <round> (its own lease)

A run id holds no ``/`` (:func:`~etcd_rdzv.config.validate_run_id`), so the keys of one run
can never reach into another's, and a key names its run unambiguously
(:func:`parse_run_key`). Everything a run owns besides the state key sits under
:attr:`RunKeys.run_prefix`, so one range deletes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import DEFAULT_KEY_PREFIX, validate_key_prefix, validate_run_id

__all__ = ["KeyKind", "NativeKey", "RunKeys", "parse_run_key", "runs_prefix"]

#: What a key of a run is: the torch handler's state, a store key, a native-protocol key.
KeyKind = Literal["state", "store", "native"]

_STORE = "store"
_NATIVE = "native"


@dataclass(frozen=True)
class NativeKey:
    """A native-protocol key, parsed (:meth:`RunKeys.parse_native`)."""

    kind: Literal["run_lease", "closed", "seal", "waiting", "member"]
    round: int = 0
    """For ``seal``, ``waiting`` and ``member``: the round."""
    node_name: bytes = b""
    """For ``member``: the node (:attr:`etcd_rdzv.native.NodeId.name`)."""


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run. Built from validated values: an invalid prefix or run id
    raises :class:`ValueError` naming the option."""

    run_id: str
    """The rendezvous id (torchrun's ``--rdzv-id``)."""
    key_prefix: str = DEFAULT_KEY_PREFIX
    """Where the runs live; kept without a trailing ``/``."""

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        object.__setattr__(self, "key_prefix", validate_key_prefix(self.key_prefix))

    @property
    def state(self) -> bytes:
        """The key of torch's pickled rendezvous state (``handler=torch``)."""
        return f"{self.key_prefix}/{self.run_id}".encode()

    @property
    def run_prefix(self) -> bytes:
        """The prefix of every other key of the run (store, native)."""
        return self.state + b"/"

    @property
    def store_prefix(self) -> bytes:
        """The prefix of the run's store keys; a store key is this plus its name."""
        return self.run_prefix + _STORE.encode() + b"/"

    @property
    def native_prefix(self) -> bytes:
        """The prefix of the native rendezvous's keys (see :mod:`etcd_rdzv.native`)."""
        return self.run_prefix + _NATIVE.encode() + b"/"

    @property
    def control_prefix(self) -> bytes:
        """The native keys every node watches: few, small, changed a few times a round."""
        return self.native_prefix + b"ctl/"

    @property
    def run_lease(self) -> bytes:
        """Holds the id of the run lease that the run's shared native keys are put with."""
        return self.control_prefix + b"lease"

    @property
    def closed(self) -> bytes:
        """Exists once the native run is closed."""
        return self.control_prefix + b"closed"

    @property
    def seal_prefix(self) -> bytes:
        return self.control_prefix + b"seal/"

    def seal(self, round_: int) -> bytes:
        """Exists once ``round_`` is sealed; rounds are zero-padded so keys sort by round."""
        return self.seal_prefix + b"%010d" % round_

    @property
    def waiting_prefix(self) -> bytes:
        return self.control_prefix + b"wait/"

    def waiting(self, round_: int) -> bytes:
        """Exists while some node waits to be admitted in ``round_``."""
        return self.waiting_prefix + b"%010d" % round_

    @property
    def rounds_prefix(self) -> bytes:
        """The prefix of every round's join keys."""
        return self.native_prefix + b"round/"

    def parse_native(self, key: bytes) -> NativeKey | None:
        """What a key under :attr:`native_prefix` is; None for a key of no known kind."""
        if key == self.run_lease:
            return NativeKey("run_lease")
        if key == self.closed:
            return NativeKey("closed")
        if key.startswith(self.seal_prefix):
            digits = key[len(self.seal_prefix):]
            return NativeKey("seal", int(digits)) if digits.isdigit() else None
        if key.startswith(self.waiting_prefix):
            digits = key[len(self.waiting_prefix):]
            return NativeKey("waiting", int(digits)) if digits.isdigit() else None
        if key.startswith(self.rounds_prefix):
            digits, slash, name = key[len(self.rounds_prefix):].partition(b"/")
            if digits.isdigit() and slash and name:
                return NativeKey("member", int(digits), name)
        return None

    def round_prefix(self, round_: int) -> bytes:
        """The prefix of the join keys of ``round_``: one key per node, sorted as torch
        sorts node descriptors (see :class:`~etcd_rdzv.native.NodeId`)."""
        return self.rounds_prefix + b"%010d/" % round_

    def member(self, round_: int, node_name: bytes) -> bytes:
        """A node's join key in ``round_``."""
        return self.round_prefix(round_) + node_name


def runs_prefix(key_prefix: str) -> bytes:
    """The prefix every run's keys start with: ``<key_prefix>/``."""
    return validate_key_prefix(key_prefix).encode() + b"/"


def parse_run_key(key_prefix: str, key: bytes) -> tuple[str, KeyKind] | None:
    """The run a key belongs to and what kind of key it is; None for a key of no run
    (another layout nested under the prefix, an invalid run id)."""
    base = runs_prefix(key_prefix)
    if not key.startswith(base):
        return None
    name, slash, rest = key[len(base):].partition(b"/")
    try:
        run_id = validate_run_id(name.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    if not slash:
        return run_id, "state"
    area = rest.partition(b"/")[0].decode(errors="replace")
    if area == _STORE and rest.startswith(_STORE.encode() + b"/"):
        return run_id, "store"
    if area == _NATIVE and rest.startswith(_NATIVE.encode() + b"/"):
        return run_id, "native"
    return None
