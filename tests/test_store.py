"""The store returned by create_backend: the calls torch's agent makes, on a real etcd."""

from __future__ import annotations

import datetime
import threading
import uuid
from collections.abc import Iterator

import pytest
from torch._C._distributed_c10d import PrefixStore
from torch.distributed import DistStoreError
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.elastic import EtcdStore, create_backend
from etcd_rdzv.testing import EtcdServer


@pytest.fixture
def store(etcd_server: EtcdServer, key_prefix: str) -> Iterator[EtcdStore]:
    backend, store = create_backend(RendezvousParameters(
        "etcd-v3", etcd_server.get_endpoint(), f"run-{uuid.uuid4().hex[:6]}", 1, 1,
        key_prefix=key_prefix, read_timeout="10",
    ))
    assert isinstance(store, EtcdStore)
    store.set_timeout(datetime.timedelta(seconds=5))
    yield store
    backend.close()


def test_set_then_get_returns_bytes(store: EtcdStore) -> None:
    store.set("k", "text")
    store.set("b", b"\x00\xffbinary")
    assert store.get("k") == b"text"
    assert store.get("b") == b"\x00\xffbinary"


def test_get_times_out_with_dist_store_error_naming_the_key(store: EtcdStore) -> None:
    store.set_timeout(datetime.timedelta(seconds=0.5))
    with pytest.raises(DistStoreError, match=r"\['never_set'\]"):
        store.get("never_set")


def test_wait_returns_once_every_key_is_set(store: EtcdStore) -> None:
    def set_both() -> None:
        store.set("a", "1")
        store.set("b", "2")

    setter = threading.Timer(0.3, set_both)
    setter.start()
    store.wait(["a", "b"], datetime.timedelta(seconds=5))
    assert store.check(["a", "b"])
    setter.join()


def test_wait_times_out_naming_the_missing_keys(store: EtcdStore) -> None:
    store.set("present", "1")
    with pytest.raises(DistStoreError, match=r"\['absent'\]"):
        store.wait(["present", "absent"], datetime.timedelta(seconds=0.5))


def test_check_does_not_wait(store: EtcdStore) -> None:
    assert not store.check(["x"])
    store.set("x", "1")
    assert store.check(["x"])
    assert not store.check(["x", "y"])


def test_add_counts_from_zero_and_is_atomic_under_16_threads(store: EtcdStore) -> None:
    assert store.add("fresh", 5) == 5
    assert store.add("fresh", -2) == 3

    def add_ten() -> None:
        for _ in range(10):
            store.add("counter", 1)

    threads = [threading.Thread(target=add_ten) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("counter") == b"160"


def test_add_on_a_non_integer_value_names_the_key(store: EtcdStore) -> None:
    store.set("word", "hello")
    with pytest.raises(ValueError, match=r"The store key 'word' holds b'hello'"):
        store.add("word", 1)


def test_delete_key_and_num_keys(store: EtcdStore) -> None:
    assert store.num_keys() == 0
    store.set("a", "1")
    store.set("b", "2")
    assert store.num_keys() == 2
    assert store.delete_key("a")
    assert not store.delete_key("a")
    assert store.num_keys() == 1


def test_prefix_store_over_it_works_as_torch_uses_it(store: EtcdStore) -> None:
    prefixed = PrefixStore("torch.rendezvous.run.0", store)
    prefixed.set("MASTER_ADDR", "127.0.0.1")
    assert prefixed.get("MASTER_ADDR") == b"127.0.0.1"
    assert store.get("torch.rendezvous.run.0/MASTER_ADDR") == b"127.0.0.1"
    assert prefixed.add("count", 2) == 2


def test_runs_do_not_share_keys(etcd_server: EtcdServer, key_prefix: str) -> None:
    def make(run_id: str) -> EtcdStore:
        _, store = create_backend(RendezvousParameters(
            "etcd-v3", etcd_server.get_endpoint(), run_id, 1, 1, key_prefix=key_prefix))
        assert isinstance(store, EtcdStore)
        return store

    first, second = make("job-a"), make("job-b")
    first.set("MASTER_PORT", "1")
    assert not second.check(["MASTER_PORT"])
