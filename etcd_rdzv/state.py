"""torch's rendezvous state, decoded safely: a typed, read-only view, without torch.

torch's ``DynamicRendezvousHandler`` stores its ``_RendezvousState`` as a pickle, and
``pickle.loads`` runs whatever a pickle names: anyone who can write the state key can run
code in every agent that reads it. This module reads the state with a restricted
unpickler that admits only what torch's state is made of:

* torch's ``_RendezvousState`` and ``_NodeDesc``
  (``torch.distributed.elastic.rendezvous.dynamic_rendezvous``), loaded as local stand-in
  classes, so torch is never imported;
* ``datetime.datetime``, ``datetime.timedelta`` and ``datetime.timezone``;
* the builtin containers ``dict``, ``set``, ``frozenset``, ``list`` and ``tuple``.

Any other global (``os.system``, ``builtins.exec``, ...) raises
:class:`~etcd_rdzv.errors.EtcdStateError` naming it, before anything is called.

Three kinds of failure, told apart because an operator's fix differs:

* **not a torch state** (:class:`NotATorchStateError`): the value is no pickle of torch's
  ``_RendezvousState`` at all (``b"hello"``, a pickled dict): another program wrote the key;
* **refused**: the pickle names a global outside the list above (nothing ran);
* **malformed or corrupt**: it names torch's state but does not unpickle, or its fields are
  not torch's (:class:`~etcd_rdzv.errors.EtcdStateError`).

* :func:`decode_state` returns a :class:`RendezvousStateView`.
* :func:`encode_closed` returns the same state marked closed, as a pickle torch's handler
  loads (what its ``set_closed()`` writes).
"""

from __future__ import annotations

import datetime
import io
import pickle
import pickletools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import EtcdStateError, NotATorchStateError

__all__ = [
    "TORCH_STATE_MODULE",
    "NodeDesc",
    "RendezvousStateView",
    "decode_state",
    "encode_closed",
]

#: The module of torch's ``_RendezvousState`` and ``_NodeDesc``, as pickles name it.
TORCH_STATE_MODULE = "torch.distributed.elastic.rendezvous.dynamic_rendezvous"

_UTC = datetime.timezone.utc



class _PickledNode:
    """The stand-in for torch's ``_NodeDesc`` while unpickling: hashable by its fields."""

    __slots__ = ("addr", "local_id", "pid")
    addr: str
    pid: int
    local_id: int

    def __setstate__(self, state: object) -> None:
        if type(state) is not dict or state.keys() != _NODE_FIELDS:
            raise _NotAStateError(f"a _NodeDesc has the state {_brief(state)}, not the "
                                  "attributes addr, pid and local_id")
        self.addr, self.pid, self.local_id = state["addr"], state["pid"], state["local_id"]

    def __getstate__(self) -> dict[str, Any]:
        return {"addr": self.addr, "pid": self.pid, "local_id": self.local_id}

    def _key(self) -> tuple[object, object, object]:
        # An attribute error (a node used before its state was set) fails the decoding.
        return self.addr, self.pid, self.local_id

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PickledNode) and self._key() == other._key()


class _PickledState:
    """The stand-in for torch's ``_RendezvousState`` while unpickling."""

    def __setstate__(self, state: object) -> None:
        _set_attributes(self, state, "_RendezvousState")

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)


_NODE_FIELDS = {"addr", "pid", "local_id"}


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _set_attributes(obj: object, state: object, what: str) -> None:
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise _NotAStateError(f"the {what} has a state of type {type(state).__name__}, "
                         "not a dict of attributes")
    obj.__dict__.update(state)


class _NotAStateError(Exception):
    """The pickle loaded but is not shaped like torch's state; the message says how."""


class _RefusedGlobalError(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified_name = f"{module}.{name}"


_CONTAINERS: dict[str, type] = {
    "dict": dict, "set": set, "frozenset": frozenset, "list": list, "tuple": tuple,
}
_ALLOWED: dict[tuple[str, str], Any] = {
    (TORCH_STATE_MODULE, "_RendezvousState"): _PickledState,
    (TORCH_STATE_MODULE, "_NodeDesc"): _PickledNode,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    # "__builtin__": pickles of protocol 2 and lower name Python 2's module.
    **{(module, name): kind for module in ("builtins", "__builtin__")
       for name, kind in _CONTAINERS.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of torch's rendezvous state."""

    def find_class(self, module_name: str, global_name: str, /) -> Any:
        try:
            return _ALLOWED[(module_name, global_name)]
        except KeyError:
            raise _RefusedGlobalError(module_name, global_name) from None

    def persistent_load(self, pid: Any, /) -> Any:
        raise _NotAStateError("the pickle refers to a persistent object")


def _where(key: bytes | str | None) -> str:
    if key is None:
        return ""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    return f" at key {text!r}"


def _load(pickled: bytes, key: bytes | str | None) -> _PickledState:
    """Unpickle ``pickled`` with the restricted unpickler; a ``_PickledState`` or raise."""
    where = _where(key)
    if not isinstance(pickled, (bytes, bytearray, memoryview)):
        raise TypeError(f"A rendezvous state must be bytes, got {type(pickled).__name__}.")
    try:
        loaded = _RestrictedUnpickler(io.BytesIO(pickled)).load()
    except _RefusedGlobalError as exc:
        raise EtcdStateError(
            f"The rendezvous state{where} was refused: it references the global "
            f"{exc.qualified_name}, which is not part of torch's rendezvous state (admitted: "
            "torch's _RendezvousState and _NodeDesc, datetime and builtin containers). It was "
            "not loaded and nothing in it ran."
        ) from None
    except _NotAStateError as exc:
        raise EtcdStateError(f"The rendezvous state{where} is not a plain rendezvous state: "
                             f"{exc}.") from None
    except Exception as exc:  # any malformed pickle: truncated, bad opcode, bad arguments
        reason = f"it does not unpickle ({type(exc).__name__}: {exc})"
        if TORCH_STATE_MODULE.encode() in pickled:
            raise EtcdStateError(f"The rendezvous state{where} is corrupt: it names torch's "
                                 f"state, but {reason}.") from None
        if not pickled:
            reason = "it is empty"
        elif not pickled.startswith(_PICKLE_PROTO):  # torch pickles with protocol 2 or later
            reason = f"it is not a pickle: it starts with {bytes(pickled[:16])!r}"
        raise NotATorchStateError(_not_a_torch_state(where, pickled, reason)) from None
    if not isinstance(loaded, _PickledState):
        raise NotATorchStateError(_not_a_torch_state(
            where, pickled, f"the pickle holds a {type(loaded).__name__}, not torch's "
            "_RendezvousState"))
    return loaded


_PICKLE_PROTO = pickle.PROTO


def _not_a_torch_state(where: str, pickled: bytes, reason: str) -> str:
    return (f"The value{where} is not a torch rendezvous state ({len(pickled):,} bytes): "
            f"{reason}. Did another program write it?")


@dataclass(frozen=True, order=True, slots=True)
class NodeDesc:
    """A node of the rendezvous, as torch's ``_NodeDesc`` describes it.

    Its string form is torch's: ``<addr>_<pid>_<local_id>``.
    """

    addr: str
    """The node's address: its FQDN or the ``local_addr`` it was given."""
    pid: int
    """The process id of the rendezvous handler on that node."""
    local_id: int
    """A number unique within that process (one per handler it created)."""

    def __str__(self) -> str:
        return f"{self.addr}_{self.pid}_{self.local_id}"


@dataclass(frozen=True)
class RendezvousStateView:
    """A read-only copy of torch's ``_RendezvousState``, typed.

    Built by :func:`decode_state`; changing it changes nothing in etcd.
    """

    round: int
    """The rendezvous round; it grows by one each time a new round starts."""
    complete: bool
    """Whether the current round is complete (its participants got their ranks)."""
    deadline: datetime.datetime | None
    """When a round that has ``min_nodes`` but not ``max_nodes`` completes anyway (UTC)."""
    closed: bool
    """Whether the rendezvous is closed: agents finish and no node may join."""
    participants: Mapping[NodeDesc, int] = field(default_factory=lambda: MappingProxyType({}))
    """Each participant of the current round and its rank."""
    wait_list: frozenset[NodeDesc] = frozenset()
    """Nodes waiting to join the next round."""
    redundancy_list: frozenset[NodeDesc] = frozenset()
    """Nodes beyond ``max_nodes``, kept in reserve for the next round."""
    last_heartbeats: Mapping[NodeDesc, datetime.datetime] = field(
        default_factory=lambda: MappingProxyType({}))
    """Each node's last keep-alive, as the node's clock read it (UTC)."""

    @property
    def world_size(self) -> int:
        """The number of participants."""
        return len(self.participants)

    @property
    def nodes(self) -> list[NodeDesc]:
        """Every node the state names: participants by rank, then the others in order."""
        ranked = sorted(self.participants, key=lambda node: self.participants[node])
        others = (set(self.wait_list) | set(self.redundancy_list)
                  | set(self.last_heartbeats)) - set(self.participants)
        return ranked + sorted(others)

    def role(self, node: NodeDesc) -> str:
        """``participant``, ``waiting``, ``redundant``, or ``heartbeat`` (known only by its
        heartbeat: it left or is being removed)."""
        if node in self.participants:
            return "participant"
        if node in self.wait_list:
            return "waiting"
        if node in self.redundancy_list:
            return "redundant"
        return "heartbeat"

    def heartbeat_ages(
        self, now: datetime.datetime | None = None
    ) -> dict[NodeDesc, datetime.timedelta]:
        """How long ago each node's last heartbeat was, seen from ``now``.

        Args:
            now: the reference time, timezone-aware; the current UTC time if None. torch
                writes heartbeats with each node's own clock, so clock skew shows here.
        """
        reference = datetime.datetime.now(_UTC) if now is None else now
        return {node: reference - beat for node, beat in self.last_heartbeats.items()}

    def to_dict(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        """The state as JSON-ready data (what ``etcd-rdzv status --json`` prints).

        Args:
            now: the reference time of ``heartbeat_age_s``; the current UTC time if None.
        """
        ages = self.heartbeat_ages(now)
        return {
            "round": self.round,
            "complete": self.complete,
            "closed": self.closed,
            "deadline": self.deadline.isoformat() if self.deadline is not None else None,
            "world_size": self.world_size,
            "nodes": [
                {
                    "node": str(node),
                    "addr": node.addr,
                    "pid": node.pid,
                    "local_id": node.local_id,
                    "role": self.role(node),
                    "rank": self.participants.get(node),
                    "last_heartbeat": self.last_heartbeats[node].isoformat()
                    if node in self.last_heartbeats else None,
                    "heartbeat_age_s": round(ages[node].total_seconds(), 3)
                    if node in ages else None,
                }
                for node in self.nodes
            ],
        }


class _Nodes:
    """Turns the stand-in nodes into :class:`NodeDesc`, each one once (a node appears in
    several fields, as one shared object of the pickle)."""

    def __init__(self) -> None:
        self._done: dict[int, NodeDesc] = {}

    def __call__(self, value: object, what: str) -> NodeDesc:
        done = self._done.get(id(value))
        if done is not None:
            return done
        if type(value) is not _PickledNode:
            raise _NotAStateError(f"{what} holds a {type(value).__name__}, not a _NodeDesc")
        addr, pid, local_id = value._key()
        if type(addr) is not str or type(pid) is not int or type(local_id) is not int:
            raise _NotAStateError(f"{what} holds a _NodeDesc with fields of the wrong types "
                                  f"(addr={addr!r}, pid={pid!r}, local_id={local_id!r})")
        node = self._done[id(value)] = NodeDesc(addr, pid, local_id)
        return node


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _view(state: _PickledState) -> RendezvousStateView:
    attributes = state.__dict__
    missing = [name for name in ("round", "complete", "deadline", "closed", "participants",
                                 "wait_list", "last_heartbeats") if name not in attributes]
    if missing:
        raise _NotAStateError(f"the _RendezvousState lacks {', '.join(missing)}")
    round_, complete, closed = attributes["round"], attributes["complete"], attributes["closed"]
    deadline = attributes["deadline"]
    if not _is_int(round_):
        raise _NotAStateError(f"round is a {type(round_).__name__}, not an int")
    if not isinstance(complete, bool) or not isinstance(closed, bool):
        raise _NotAStateError("complete and closed must be booleans")
    if deadline is not None and not isinstance(deadline, datetime.datetime):
        raise _NotAStateError(f"deadline is a {type(deadline).__name__}, not a datetime")

    node = _Nodes()

    def mapping(name: str, value_type: type, value_name: str) -> dict[NodeDesc, Any]:
        value = attributes[name]
        if not isinstance(value, dict):
            raise _NotAStateError(f"{name} is a {type(value).__name__}, not a dict")
        result: dict[NodeDesc, Any] = {}
        for key, item in value.items():
            if type(item) is not value_type:
                raise _NotAStateError(f"{name} maps a node to a {type(item).__name__}, "
                                      f"not {value_name}")
            result[node(key, name)] = item
        return result

    def nodes(name: str) -> frozenset[NodeDesc]:
        value = attributes.get(name, set())  # redundancy_list is new in torch 2.4
        if not isinstance(value, (set, frozenset)):
            raise _NotAStateError(f"{name} is a {type(value).__name__}, not a set")
        return frozenset(node(item, name) for item in value)

    return RendezvousStateView(
        round=round_,
        complete=complete,
        deadline=deadline,
        closed=closed,
        participants=MappingProxyType(mapping("participants", int, "a rank")),
        wait_list=nodes("wait_list"),
        redundancy_list=nodes("redundancy_list"),
        last_heartbeats=MappingProxyType(
            mapping("last_heartbeats", datetime.datetime, "a datetime")),
    )


def decode_state(pickled: bytes, *, key: bytes | str | None = None) -> RendezvousStateView:
    """Decode a pickled torch ``_RendezvousState`` without running anything in it.

    Args:
        pickled: the state as torch's handler pickles it (what ``get_state`` returns).
        key: the etcd key it came from, for error messages only.

    Raises:
        NotATorchStateError: ``pickled`` is no pickle of torch's state at all.
        EtcdStateError: the pickle names a global other than those of torch's state (the
            message names it; nothing was called), is malformed, or is not shaped like
            torch's state.
    """
    state = _load(pickled, key)
    try:
        return _view(state)
    except _NotAStateError as exc:
        raise EtcdStateError(f"The rendezvous state{_where(key)} is not a plain rendezvous "
                             f"state: {exc}.") from None


def encode_closed(pickled: bytes, *, key: bytes | str | None = None) -> bytes:
    """The same state marked closed, pickled so that torch's handler loads it.

    This is what torch's ``set_closed()`` writes (``state.closed = True``); every other
    attribute is kept as it was. The state is checked as :func:`decode_state` checks it
    first, and torch is not imported.

    Raises:
        EtcdStateError: as :func:`decode_state`.
    """
    state = _load(pickled, key)
    try:
        _view(state)
    except _NotAStateError as exc:
        raise EtcdStateError(f"The rendezvous state{_where(key)} is not a plain rendezvous "
                             f"state: {exc}.") from None
    state.__dict__["closed"] = True
    return _torch_pickle(state)


#: Each stand-in class as pickle names it, and the name of torch's class it stands for.
_RENAMES = {
    f"{__name__} {_PickledState.__qualname__}":
        f"c{TORCH_STATE_MODULE}\n_RendezvousState\n".encode(),
    f"{__name__} {_PickledNode.__qualname__}": f"c{TORCH_STATE_MODULE}\n_NodeDesc\n".encode(),
}


def _torch_pickle(state: _PickledState) -> bytes:
    """Pickle the stand-ins under torch's class names, without importing torch.

    pickle refuses to name a class after another module, so the state is pickled with
    protocol 3, whose class references are ``GLOBAL`` opcodes holding the names as text
    (no frames, no lengths around them), and those opcodes of the stand-ins are rewritten.
    Only opcodes are rewritten, never data: a node address holding the same text is a string
    operand, left alone.
    """
    raw = pickle.dumps(state, protocol=3)
    parts: list[bytes] = []
    ops = list(pickletools.genops(raw))
    for index, (opcode, arg, position) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(raw)
        assert position is not None and end is not None
        if opcode.name == "GLOBAL" and arg in _RENAMES:
            parts.append(_RENAMES[arg])
        else:
            parts.append(raw[position:end])
    return b"".join(parts)
