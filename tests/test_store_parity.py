"""One suite, two stores: every call against torch's ``TCPStore`` and our ``EtcdStore``.

A test that passes for one and fails for the other is a difference in behaviour; the only
deliberate ones are listed in docs/store.md and tested separately at the bottom.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch.distributed import DistStoreError
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.elastic import EtcdStore, create_backend
from etcd_rdzv.testing import EtcdServer

SHORT = datetime.timedelta(seconds=0.5)
#: torch's stubs lack append, multi_set and has_extended_api, which both stores have.
AnyStore = Any


@pytest.fixture(params=["tcp", "etcd"])
def stores(
    request: pytest.FixtureRequest, key_prefix: str
) -> Iterator[tuple[AnyStore, AnyStore]]:
    """The store under test and a second client of the same store (another "node")."""
    timeout = datetime.timedelta(seconds=5)
    if request.param == "tcp":
        # Two clients: the master's own and the peer's.
        main = TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
        peer = TCPStore("127.0.0.1", main.port, 2, False,
                        timeout=datetime.timedelta(seconds=60))  # connecting on a busy machine
        peer.set_timeout(timeout)
        yield main, peer
        return
    server: EtcdServer = request.getfixturevalue("etcd_server")
    params = RendezvousParameters("etcd-v3", server.get_endpoint(),
                                  f"parity-{uuid.uuid4().hex[:6]}", 1, 1, key_prefix=key_prefix)
    (backend, etcd_main), (peer_backend, etcd_peer) = create_backend(params), create_backend(params)
    etcd_main.set_timeout(timeout)
    yield etcd_main, etcd_peer
    backend.close()
    peer_backend.close()


@pytest.fixture
def store(stores: tuple[AnyStore, AnyStore]) -> AnyStore:
    return stores[0]


def test_set_get_str_and_bytes(store: AnyStore) -> None:
    store.set("s", "text")
    store.set("b", b"\x00\x01")
    store.set("empty", "")
    assert (store.get("s"), store.get("b"), store.get("empty")) == (b"text", b"\x00\x01", b"")


def test_set_overwrites(store: AnyStore) -> None:
    store.set("k", "1")
    store.set("k", "2")
    assert store.get("k") == b"2"


def test_get_blocks_until_another_client_sets(stores: tuple[AnyStore, AnyStore]) -> None:
    store, peer = stores
    timer = threading.Timer(0.3, peer.set, ("late", "v"))
    timer.start()
    assert store.get("late") == b"v"
    timer.join()


def test_get_of_a_missing_key_raises_dist_store_error(store: AnyStore) -> None:
    store.set_timeout(SHORT)
    with pytest.raises(DistStoreError):
        store.get("missing")


def test_wait_with_and_without_timeout(store: AnyStore) -> None:
    store.set("a", "1")
    store.wait(["a"])
    store.wait(["a"], datetime.timedelta(seconds=1))
    with pytest.raises(DistStoreError):
        store.wait(["a", "missing"], SHORT)


def test_check(store: AnyStore) -> None:
    assert not store.check(["x"])
    store.set("x", "1")
    assert store.check(["x"])
    assert not store.check(["x", "y"])


def test_add(store: AnyStore) -> None:
    assert store.add("n", 3) == 3
    assert store.add("n", -5) == -2
    assert store.get("n") == b"-2"
    store.set("m", "10")
    assert store.add("m", 1) == 11


def test_add_from_threads_is_atomic(store: AnyStore) -> None:
    def bump() -> None:
        for _ in range(5):
            store.add("c", 1)

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("c") == b"40"


@pytest.mark.parametrize(
    ("initial", "expected", "desired", "returned", "after"),
    [
        (None, "", "new", b"new", b"new"),  # absent, expected empty: set
        (None, "x", "new", b"x", None),  # absent, expected non-empty: no set, returns expected
        ("old", "old", "new", b"new", b"new"),  # match: set
        ("old", "zz", "new", b"old", b"old"),  # mismatch: current value
        ("old", "", "new", b"old", b"old"),  # present, expected empty: current value
    ],
)
def test_compare_set(store: AnyStore, initial: str | None, expected: str, desired: str,
                     returned: bytes, after: bytes | None) -> None:
    if initial is not None:
        store.set("k", initial)
    assert store.compare_set("k", expected, desired) == returned
    if after is None:
        assert not store.check(["k"])
    else:
        assert store.get("k") == after


def test_append(store: AnyStore) -> None:
    store.append("log", "a")
    store.append("log", b"b")
    assert store.get("log") == b"ab"


def test_multi_set_and_multi_get(store: AnyStore) -> None:
    store.multi_set(["m1", "m2"], ["1", b"2"])
    assert store.multi_get(["m2", "m1"]) == [b"2", b"1"]


def test_multi_get_waits_for_missing_keys(store: AnyStore) -> None:
    store.set_timeout(SHORT)
    store.set("here", "1")
    with pytest.raises(DistStoreError):
        store.multi_get(["here", "missing"])


def test_delete_key_and_num_keys(store: AnyStore) -> None:
    before = store.num_keys()
    store.set("d", "1")
    assert store.num_keys() == before + 1
    assert store.delete_key("d")
    assert not store.delete_key("d")
    assert store.num_keys() == before


def test_has_extended_api(store: AnyStore) -> None:
    assert store.has_extended_api()


def test_prefix_store_over_it(store: AnyStore) -> None:
    prefixed = PrefixStore("torch.rendezvous.job.0", store)
    prefixed.set("MASTER_PORT", "29500")
    assert prefixed.get("MASTER_PORT") == b"29500"
    assert prefixed.add("count", 1) == 1
    assert prefixed.check(["MASTER_PORT"])
    assert store.get("torch.rendezvous.job.0/MASTER_PORT") == b"29500"


# Deliberate differences, each documented.

def test_etcd_add_on_a_non_integer_raises_value_error(etcd_server: EtcdServer,
                                                       key_prefix: str) -> None:
    """TCPStore drops the client connection here (its server fails to parse the value)."""
    backend, store = create_backend(RendezvousParameters(
        "etcd-v3", etcd_server.get_endpoint(), "diff", 1, 1, key_prefix=key_prefix))
    assert isinstance(store, EtcdStore)
    store.set("word", "hello")
    with pytest.raises(ValueError, match="not a decimal integer"):
        store.add("word", 1)
    assert store.get("word") == b"hello"
    backend.close()


def test_etcd_timeout_names_the_missing_keys(etcd_server: EtcdServer, key_prefix: str) -> None:
    backend, store = create_backend(RendezvousParameters(
        "etcd-v3", etcd_server.get_endpoint(), "diff", 1, 1, key_prefix=key_prefix))
    store.set_timeout(SHORT)
    store.set("a", "1")
    with pytest.raises(DistStoreError, match=r"\['b', 'c'\]"):
        store.multi_get(["a", "b", "c"])
    backend.close()


def test_etcd_multi_set_splits_at_etcds_txn_limit(etcd_server: EtcdServer,
                                                   key_prefix: str) -> None:
    backend, store = create_backend(RendezvousParameters(
        "etcd-v3", etcd_server.get_endpoint(), "diff", 1, 1, key_prefix=key_prefix))
    assert isinstance(store, EtcdStore)
    keys = [f"k{i}" for i in range(300)]
    store.multi_set(keys, [str(i) for i in range(300)])
    assert store.multi_get(keys) == [str(i).encode() for i in range(300)]
    assert store.num_keys() == 300
    assert store.list_keys() == sorted(keys)
    backend.close()
