"""What the native rendezvous talks about: nodes, settings, seals and admissions.

Plain frozen values with no I/O: the protocol (:mod:`.decide`), the node (:mod:`.node`), the
control view (:mod:`.control`) and the admin all speak of these, and only these.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import threading
from dataclasses import dataclass

from ..config import DEFAULT_TTL, integer_at_least, seconds_between

__all__ = ["Admission", "NativeSettings", "NodeId", "Seal"]

#: Between a node descriptor's parts in its key. It sorts below every character an address
#: may hold, so ``"a" < "a-b"`` holds for the keys as for torch's tuples.
_SEPARATOR = " "

_local_ids = itertools.count()
_local_ids_lock = threading.Lock()


@dataclass(frozen=True, order=True)
class NodeId:
    """A node of the rendezvous, as torch describes one (``_NodeDesc``): ordered as torch
    orders them, by address, then process id, then the process-local id."""

    addr: str
    """The node's address: ``local_addr`` or the host's FQDN."""
    pid: int
    """The process id of the handler."""
    local_id: int
    """Unique within the process (a process may run several handlers)."""

    def __post_init__(self) -> None:
        if not self.addr or any(char <= _SEPARATOR for char in self.addr):
            raise ValueError(f"The option local_addr must be an address without spaces or "
                             f"control characters, got local_addr={self.addr!r}.")

    @classmethod
    def generate(cls, local_addr: str | None = None) -> NodeId:
        """A new node of this process, as torch's ``_NodeDescGenerator`` makes them."""
        with _local_ids_lock:
            local_id = next(_local_ids)
        return cls(local_addr or socket.getfqdn(), os.getpid(), local_id)

    @property
    def name(self) -> bytes:
        """The node in keys: fixed-width numbers, so byte order is torch's order."""
        return f"{self.addr}{_SEPARATOR}{self.pid:010d}{_SEPARATOR}{self.local_id:010d}" \
            .encode()

    @classmethod
    def from_name(cls, name: bytes) -> NodeId:
        """The node a key names (:attr:`name`).

        Raises:
            ValueError: ``name`` is no node's name.
        """
        addr, pid, local_id = name.decode().rsplit(_SEPARATOR, 2)
        return cls(addr, int(pid), int(local_id))

    def __str__(self) -> str:
        return f"{self.addr}_{self.pid}_{self.local_id}"  # torch's repr of _NodeDesc


@dataclass(frozen=True)
class NativeSettings:
    """torch's rendezvous settings, checked once. Seconds may be fractional."""

    min_nodes: int
    max_nodes: int
    join_timeout: float = 600.0
    """How long :meth:`AsyncNativeRendezvous.next_rendezvous` may take."""
    last_call_timeout: float = 30.0
    """How long a round waits for more nodes once ``min_nodes`` have joined."""
    close_timeout: float = 30.0
    """How long closing the run may take."""
    heartbeat_timeout: float = 5.0
    """How long one keep-alive may take."""
    keep_alive_interval: float = 5.0
    """Seconds between keep-alives; also how often a waiting node counts its round."""
    keep_alive_max_attempt: int = 3
    """Keep-alives a node may miss before it counts as gone (its lease expires)."""
    ttl: int = DEFAULT_TTL
    """Seconds the run's shared keys outlive its last node."""

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen: normalized once, here
        set_field(self, "min_nodes", integer_at_least("min_nodes", self.min_nodes, 1))
        set_field(self, "max_nodes", integer_at_least("max_nodes", self.max_nodes, 1))
        if self.max_nodes < self.min_nodes:
            raise ValueError(f"The maximum number of nodes ({self.max_nodes}) must be greater "
                             f"than or equal to the minimum number of nodes ({self.min_nodes}).")
        for name in ("join_timeout", "last_call_timeout", "close_timeout",
                     "heartbeat_timeout", "keep_alive_interval"):
            set_field(self, name, seconds_between(name, getattr(self, name), 0, low_open=True))
        set_field(self, "keep_alive_max_attempt",
                  integer_at_least("keep_alive_max_attempt", self.keep_alive_max_attempt, 1))
        set_field(self, "ttl", integer_at_least("ttl", self.ttl, 1))

    @property
    def node_ttl(self) -> int:
        """The TTL of a node's lease: torch's heartbeat timeout, in whole seconds."""
        return max(1, math.ceil(self.keep_alive_interval * self.keep_alive_max_attempt))


@dataclass(frozen=True)
class Seal:
    """A sealed round, as ``ctl/seal/<round>`` holds it."""

    round: int
    cutoff: int
    """The roster is every join key of the round that existed at this revision."""
    size: int
    """The number of nodes in the roster: the world size."""
    sealed_at: float
    """When it was sealed (the sealer's ``time.time()``)."""
    sealer: str
    """The node that sealed it."""

    def encode(self) -> bytes:
        return json.dumps({"round": self.round, "cutoff": self.cutoff, "size": self.size,
                           "sealed_at": self.sealed_at, "sealer": self.sealer}).encode()

    @classmethod
    def decode(cls, value: bytes) -> Seal:
        """The seal a ``ctl/seal/<round>`` value holds.

        Raises:
            ValueError: the value is no seal (another program wrote the key).
        """
        try:
            data = json.loads(value)
            return cls(int(data["round"]), int(data["cutoff"]), int(data["size"]),
                       float(data["sealed_at"]), str(data["sealer"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a seal: {value[:80]!r} ({exc})") from exc


@dataclass(frozen=True)
class Admission:
    """A node's place in a sealed round: what :meth:`AsyncNativeRendezvous.next_rendezvous`
    returns."""

    round: int
    rank: int
    world_size: int
