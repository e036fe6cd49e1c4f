"""Safe decoding of torch's rendezvous state (etcd_rdzv.state) and the verify_state option.

The states are torch's own (``_RendezvousState`` pickled as torch's handler pickles it); the
malicious pickles would run code if ``pickle.loads`` saw them, and each test checks that
the marker file they would write stays absent.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch.distributed import HashStore  # type: ignore[attr-defined]
from torch.distributed.elastic.rendezvous import (
    RendezvousParameters,
    RendezvousStateError,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    RendezvousBackend,
    Token,
    _NodeDesc,
    _RendezvousState,
)
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    create_handler as torch_create_handler,
)

from etcd_rdzv import (
    AsyncEtcdRendezvousBackend,
    EtcdClient,
    EtcdConfig,
    EtcdStateError,
    NodeDesc,
    RendezvousConfig,
    RendezvousStateView,
    decode_state,
    encode_closed,
)
from etcd_rdzv.elastic import EtcdRendezvousBackend
from etcd_rdzv.testing import EtcdServer
from etcd_rdzv.testing.states import WritesMarker, torch_state

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def rich_state() -> _RendezvousState:
    """A torch state with every field set: participants, waiting and redundant nodes."""
    state = _RendezvousState()
    state.round, state.complete = 3, False
    state.deadline = NOW + datetime.timedelta(seconds=30)
    a, b = _NodeDesc("10.0.0.1", 100, 0), _NodeDesc("10.0.0.2", 200, 1)
    waiting, spare = _NodeDesc("10.0.0.3", 300, 0), _NodeDesc("10.0.0.4", 400, 0)
    state.participants = {a: 0, b: 1}
    state.wait_list = {waiting}
    state.redundancy_list = {spare}
    state.last_heartbeats = {
        a: NOW - datetime.timedelta(seconds=1),
        b: NOW - datetime.timedelta(seconds=2),
        waiting: NOW - datetime.timedelta(seconds=3),
        spare: NOW - datetime.timedelta(seconds=4),
    }
    return state


class System:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


def exec_payload(marker: Path) -> bytes:
    return pickle.dumps(WritesMarker(marker))


def state_with_payload(marker: Path) -> bytes:
    """A real torch state with a payload hidden in one heartbeat."""
    state = rich_state()
    node = next(iter(state.participants))
    state.last_heartbeats[node] = WritesMarker(marker)  # type: ignore[assignment]
    return pickle.dumps(state)


# --- decoding ---------------------------------------------------------------------------------

def test_decodes_every_field_of_a_torch_state() -> None:
    view = decode_state(pickle.dumps(rich_state()))

    a, b = NodeDesc("10.0.0.1", 100, 0), NodeDesc("10.0.0.2", 200, 1)
    waiting, spare = NodeDesc("10.0.0.3", 300, 0), NodeDesc("10.0.0.4", 400, 0)
    assert (view.round, view.complete, view.closed) == (3, False, False)
    assert view.deadline == NOW + datetime.timedelta(seconds=30)
    assert dict(view.participants) == {a: 0, b: 1}
    assert view.wait_list == frozenset({waiting})
    assert view.redundancy_list == frozenset({spare})
    assert view.world_size == 2
    assert view.nodes == [a, b, waiting, spare]
    assert [view.role(node) for node in view.nodes] == [
        "participant", "participant", "waiting", "redundant"]
    assert str(a) == "10.0.0.1_100_0" == repr(_NodeDesc("10.0.0.1", 100, 0))
    assert view.heartbeat_ages(NOW) == {
        a: datetime.timedelta(seconds=1), b: datetime.timedelta(seconds=2),
        waiting: datetime.timedelta(seconds=3), spare: datetime.timedelta(seconds=4),
    }


def test_the_view_is_read_only() -> None:
    view = decode_state(torch_state(3))
    with pytest.raises(AttributeError):
        view.closed = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        view.participants[NodeDesc("x", 1, 0)] = 9  # type: ignore[index]
    assert isinstance(view.wait_list, frozenset)


def test_a_realistic_state_of_many_nodes() -> None:
    view = decode_state(torch_state(1000))
    assert (view.round, view.complete, view.world_size) == (7, True, 1000)
    assert sorted(view.participants.values()) == list(range(1000))
    ages = view.heartbeat_ages()
    assert all(datetime.timedelta(0) <= age < datetime.timedelta(minutes=1)
               for age in ages.values())


def test_to_dict_is_json_ready() -> None:
    data = decode_state(pickle.dumps(rich_state())).to_dict(NOW)
    text = json.dumps(data)
    assert json.loads(text) == data
    assert data["round"] == 3 and data["world_size"] == 2
    first = data["nodes"][0]
    assert first == {"node": "10.0.0.1_100_0", "addr": "10.0.0.1", "pid": 100, "local_id": 0,
                     "role": "participant", "rank": 0,
                     "last_heartbeat": "2026-01-02T03:04:04+00:00", "heartbeat_age_s": 1.0}
    assert data["nodes"][2]["rank"] is None and data["nodes"][2]["role"] == "waiting"


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_decodes_every_protocol_torch_may_use(protocol: int) -> None:
    view = decode_state(pickle.dumps(rich_state(), protocol=protocol))
    assert view.world_size == 2 and len(view.last_heartbeats) == 4


def test_an_empty_state_as_a_fresh_handler_writes_it() -> None:
    view = decode_state(pickle.dumps(_RendezvousState()))
    assert (view.round, view.complete, view.closed, view.deadline) == (0, False, False, None)
    assert view.nodes == []


def test_a_state_of_an_older_torch_without_redundancy_list() -> None:
    state = rich_state()
    del state.redundancy_list
    view = decode_state(pickle.dumps(state))
    assert view.redundancy_list == frozenset()


def test_decoding_does_not_import_torch(tmp_path: Path) -> None:
    path = tmp_path / "state.pickle"
    path.write_bytes(torch_state(5))
    code = (
        "import sys, pathlib\n"
        "from etcd_rdzv.state import decode_state, encode_closed\n"
        f"data = pathlib.Path({str(path)!r}).read_bytes()\n"
        "view = decode_state(data)\n"
        "assert decode_state(encode_closed(data)).closed\n"
        "print(view.world_size, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["5", "False"]


# --- refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("build", ["exec", "system", "nested"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(
    tmp_path: Path, build: str
) -> None:
    marker = tmp_path / "ran"
    pickled, named = {
        "exec": (exec_payload(marker), "builtins.exec"),
        "system": (pickle.dumps(System(f"touch {marker}")), f"{os.system.__module__}.system"),
        "nested": (state_with_payload(marker), "builtins.exec"),
    }[build]

    with pytest.raises(EtcdStateError, match=f"references the global {named}") as info:
        decode_state(pickled, key="/k/run")
    assert "at key '/k/run'" in str(info.value)
    with pytest.raises(EtcdStateError, match=named):
        encode_closed(pickled)
    assert not marker.exists()


def test_the_payload_is_real_torch_would_run_it(tmp_path: Path) -> None:
    """The control: torch's own pickle.loads runs the payload the decoder refuses."""
    marker = tmp_path / "ran"
    pickle.loads(exec_payload(marker))
    assert marker.read_text() == "ran"


@pytest.mark.parametrize(
    ("pickled", "message"),
    [
        (pickle.dumps({"round": 1}), "holds a dict, not torch's _RendezvousState"),
        (pickle.dumps([1, 2]), "holds a list"),
        (b"not a pickle", r"is not a torch rendezvous state \(12 bytes\): it is not a pickle"),
        (pickle.dumps(rich_state())[:-10], "is corrupt"),
        (pickle.dumps(datetime.datetime.now(UTC)), "holds a datetime"),
        # torch never writes protocols 0 to 2; protocol 1 needs copyreg, which is refused.
        (pickle.dumps(rich_state(), protocol=1), r"global copy_?reg\._reconstructor"),
    ],
)
def test_what_is_not_a_state_is_refused(pickled: bytes, message: str) -> None:
    with pytest.raises(EtcdStateError, match=message):
        decode_state(pickled)


def test_a_state_of_the_wrong_shape_is_refused() -> None:
    state = rich_state()
    state.participants = {"not-a-node": 0}  # type: ignore[dict-item]
    with pytest.raises(EtcdStateError, match="participants holds a str, not a _NodeDesc"):
        decode_state(pickle.dumps(state))
    state = rich_state()
    state.round = "3"  # type: ignore[assignment]
    with pytest.raises(EtcdStateError, match="round is a str"):
        decode_state(pickle.dumps(state))
    state = rich_state()
    del state.participants
    with pytest.raises(EtcdStateError, match="lacks participants"):
        decode_state(pickle.dumps(state))


def test_a_dotted_name_cannot_reach_past_the_allowed_classes() -> None:
    # Protocol 4 resolves dotted names: datetime.datetime.__class__ is `type`.
    pickled = b"\x80\x04\x8c\x08datetime\x8c\x12datetime.__class__\x93."
    with pytest.raises(EtcdStateError, match=r"global datetime\.datetime\.__class__"):
        decode_state(pickled)


def test_decode_wants_bytes() -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        decode_state("text")  # type: ignore[arg-type]


# --- encode_closed ------------------------------------------------------------------------------

class MemoryBackend(RendezvousBackend):
    """A backend holding one state in memory: enough for torch's handler to read it."""

    def __init__(self, state: bytes) -> None:
        self._state, self._token = state, 1

    @property
    def name(self) -> str:
        return "memory"

    def get_state(self) -> tuple[bytes, Token] | None:
        return self._state, self._token

    def set_state(self, state: bytes, token: Token | None = None
                  ) -> tuple[bytes, Token, bool] | None:
        if token != self._token:
            return self._state, self._token, False
        self._state, self._token = state, self._token + 1
        return self._state, self._token, True


def test_encode_closed_is_the_same_state_closed_as_torch_loads_it() -> None:
    original = rich_state()
    closed_bytes = encode_closed(pickle.dumps(original))

    loaded = pickle.loads(closed_bytes)  # torch's handler does exactly this
    assert type(loaded) is _RendezvousState
    assert loaded.closed is True
    assert {k: v for k, v in vars(loaded).items() if k != "closed"} == \
        {k: v for k, v in vars(original).items() if k != "closed"}
    assert all(type(node) is _NodeDesc for node in loaded.participants)
    assert decode_state(closed_bytes).closed


def test_torchs_handler_reads_an_encode_closed_state_as_closed() -> None:
    backend = MemoryBackend(encode_closed(torch_state(4)))
    params = RendezvousParameters(backend="memory", endpoint="", run_id="r", min_nodes=1,
                                  max_nodes=4)
    handler = torch_create_handler(HashStore(), backend, params)
    assert handler.is_closed()


def test_encode_closed_leaves_look_alike_data_alone() -> None:
    """Only the stand-ins' class references are renamed, never a string that reads alike."""
    tricky = "x\ncetcd_rdzv.state\n_PickledState\netcd_rdzv.state _PickledNode"
    state = _RendezvousState()
    node = _NodeDesc(tricky, 1, 0)
    state.participants = {node: 0}
    state.last_heartbeats = {node: NOW}
    loaded = pickle.loads(encode_closed(pickle.dumps(state)))
    assert [n.addr for n in loaded.participants] == [tricky]
    assert loaded.closed


def test_encode_closed_of_a_malformed_state_raises() -> None:
    with pytest.raises(EtcdStateError, match=r"not a torch rendezvous state .* holds a dict"):
        encode_closed(pickle.dumps({"closed": False}))


# --- the verify_state option ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, False), ("1", True), ("true", True), ("T", True), ("yes", True), ("Y", True),
     ("0", False), ("false", False), ("f", False), ("NO", False), ("n", False), (True, True),
     (0, False), (" yes ", True), ("", False)],
)
def test_verify_state_option_takes_torchs_bool_words(value: object, expected: bool) -> None:
    options = {} if value is None else {"verify_state": value}
    assert RendezvousConfig.from_options("h", "r", options).verify_state is expected


@pytest.mark.parametrize("value", ["maybe", "2", 2, "on"])
def test_verify_state_option_names_a_bad_value(value: object) -> None:
    with pytest.raises(ValueError, match=f"The option verify_state must be a boolean .*got "
                                         f"verify_state={value!r}"):
        RendezvousConfig.from_options("h", "r", {"verify_state": value})


async def test_verify_state_refuses_a_malicious_state_on_get_and_on_conflict(
    etcd_client: EtcdClient, key_prefix: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    plain = AsyncEtcdRendezvousBackend(etcd_client, "evil", key_prefix=key_prefix)
    checked = AsyncEtcdRendezvousBackend(etcd_client, "evil", key_prefix=key_prefix,
                                         verify_state=True)
    written = await plain.set_state(state_with_payload(marker))
    assert written is not None

    with pytest.raises(EtcdStateError, match=r"references the global builtins\.exec"):
        await checked.get_state()
    # A conflicted write returns the current state: that one is checked too.
    with pytest.raises(EtcdStateError, match=r"builtins\.exec"):
        await checked.set_state(torch_state(2), written[1] - 1)
    with pytest.raises(EtcdStateError, match=r"builtins\.exec"):
        await checked.set_state(torch_state(2), None)
    assert not marker.exists()

    # A plain state passes, and the write path is unchanged.
    good = torch_state(2)
    result = await checked.set_state(good, written[1])
    assert result is not None and result[2]
    assert await checked.get_state() == (good, result[1])
    # Off (the default): the bytes come back unchecked, as before.
    await plain.set_state(exec_payload(marker), result[1])
    current = await plain.get_state()
    assert current is not None and current[0] == exec_payload(marker)
    assert not marker.exists()


def test_torchs_handler_over_a_verifying_backend_never_unpickles_the_payload(
    etcd_server: EtcdServer, etcd_config: EtcdConfig, key_prefix: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"

    def shim(verify_state: bool = False) -> EtcdRendezvousBackend:
        return EtcdRendezvousBackend(AsyncEtcdRendezvousBackend(
            EtcdClient(etcd_config), "evil", key_prefix=key_prefix, verify_state=verify_state))

    writer = shim()
    assert writer.set_state(exec_payload(marker)) is not None
    writer.close()

    backend = shim(verify_state=True)
    params = RendezvousParameters(backend="etcd-v3", endpoint=etcd_server.get_endpoint(),
                                  run_id="evil", min_nodes=1, max_nodes=1)
    handler = torch_create_handler(HashStore(), backend, params)
    try:
        with pytest.raises(RendezvousStateError, match=r"builtins\.exec"):
            handler.is_closed()
        assert not marker.exists()

        # The control: the same handler over a backend that does not verify runs it.
        unchecked = shim()
        with contextlib.suppress(Exception):  # exec returns None, which torch then reads
            torch_create_handler(HashStore(), unchecked, params).is_closed()
        assert marker.read_text() == "ran"
        unchecked.close()
    finally:
        backend.close()


def test_the_view_type_is_exported() -> None:
    import etcd_rdzv

    assert etcd_rdzv.RendezvousStateView is RendezvousStateView
    assert "decode_state" in etcd_rdzv.__all__ and "RendezvousAdmin" in etcd_rdzv.__all__
