"""The rendezvous backends under comparison, built the way torch builds them, and their servers.

* ``etcd-v3``: this project (:func:`etcd_rdzv.elastic.create_backend`), over the v3 API.
* ``etcd-v2``: torch's ``EtcdRendezvousBackend`` and ``EtcdStore`` (the ``python-etcd`` client,
  HTTP/JSON, base64 state), against the same etcd 3.5 started with ``--enable-v2=true``.
* ``c10d``: torch's ``C10dRendezvousBackend`` over a ``TCPStore``; the store's server runs in
  the benchmark's own process (a C++ thread: no GIL), like etcd outside the agents.

:class:`CountingBackend` wraps any of them to count and time the calls torch's handler makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from etcd_rdzv.testing import EtcdServer

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store

__all__ = [
    "C10D",
    "ETCD_V2",
    "ETCD_V3",
    "KINDS",
    "BenchServers",
    "CallCounts",
    "CountingBackend",
    "close_backend",
    "create_backend",
    "v2_unavailable",
]

ETCD_V3, ETCD_V2, C10D = "etcd-v3", "etcd-v2", "c10d"
KINDS = (ETCD_V3, ETCD_V2, C10D)
LOCAL_ADDR = "127.0.0.1"
#: etcd 3.5 serves the v2 API only when asked; torch's etcd-v2 backend needs it.
ETCD_V2_ARGS = ("--enable-v2=true",)


def v2_unavailable() -> str | None:
    """Why torch's etcd-v2 backend cannot run here, or None (it needs ``python-etcd``)."""
    if importlib.util.find_spec("etcd") is None:
        return ("python-etcd is not installed (`pip install -e '.[bench]'`, which "
                "`make bench` does)")
    return None


@dataclass
class BenchServers:
    """One etcd (v3, and v2 when python-etcd is installed) and, on demand, a TCPStore server."""

    with_tcp_store: bool = True
    extra_args: tuple[str, ...] = ()
    etcd: EtcdServer = field(init=False)
    tcp_store: Any = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.etcd = EtcdServer(extra_args=(*ETCD_V2_ARGS, *self.extra_args))

    @property
    def etcd_endpoint(self) -> str:
        return self.etcd.get_endpoint()

    @property
    def tcp_endpoint(self) -> str:
        if self.tcp_store is None:
            raise RuntimeError("No TCPStore server was started.")
        return f"{LOCAL_ADDR}:{self.tcp_store.port}"

    def endpoint(self, kind: str) -> str:
        return self.tcp_endpoint if kind == C10D else self.etcd_endpoint

    def start(self) -> None:
        self.etcd.start()
        if v2_unavailable() is None:
            self._create_v2_store_directory()
        if self.with_tcp_store:
            from torch._C._distributed_c10d import TCPStore

            # multi_tenant, as torch's c10d backend creates it; port 0: the OS picks.
            self.tcp_store = TCPStore(LOCAL_ADDR, 0, None, True,
                                      timeout=datetime.timedelta(seconds=60),
                                      wait_for_workers=False, multi_tenant=True)

    def _create_v2_store_directory(self) -> None:
        """Create the directory torch's v2 ``EtcdStore`` keeps its keys in.

        Its blocking ``get`` reads the directory, then watches it from the index the read
        returned; when the directory does not exist yet, the read returns no index and the
        watch starts from "now", so a key written in between is missed and the ``get`` waits
        out its timeout (300 s). A job hits that only on its etcd's first run; created here,
        no trial does.
        """
        from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend

        params = parameters(ETCD_V2, self.etcd_endpoint, "bench-setup")
        _backend, store = etcd_rendezvous_backend.create_backend(params)
        store.set("bench-setup", "created")

    def stop(self) -> None:
        self.tcp_store = None  # the last reference: the server thread stops
        self.etcd.stop()

    def __enter__(self) -> BenchServers:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parameters(kind: str, endpoint: str, run_id: str, *, min_nodes: int = 1,
               max_nodes: int = 1, config: Mapping[str, object] | None = None) -> Any:
    """torch's ``RendezvousParameters`` for ``kind`` (c10d: ``is_host=False``, a client)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    options: dict[str, object] = dict(config or {})
    if kind == C10D:
        options.setdefault("is_host", False)
    return RendezvousParameters(kind, endpoint, run_id, min_nodes, max_nodes,
                                local_addr=LOCAL_ADDR, **options)


def create_backend(kind: str, params: Any) -> tuple[RendezvousBackend, Store]:
    """The backend and store torch's handler factory for ``kind`` would build from ``params``."""
    if kind == ETCD_V3:
        from etcd_rdzv.elastic import create_backend as create_v3

        return create_v3(params)
    if kind == ETCD_V2:
        reason = v2_unavailable()
        if reason is not None:
            raise RuntimeError(f"etcd-v2 cannot run: {reason}")
        from torch.distributed.elastic.rendezvous import etcd_rendezvous_backend

        return etcd_rendezvous_backend.create_backend(params)
    if kind == C10D:
        from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

        return c10d_rendezvous_backend.create_backend(params)
    raise ValueError(f"Unknown backend kind {kind!r}; expected one of {KINDS}.")


def close_backend(backend: object) -> None:
    """Close what ``backend`` holds open (etcd-v3's gRPC channel); the others need nothing."""
    inner = getattr(backend, "inner", backend)
    close = getattr(inner, "close", None)
    if callable(close):
        close()


@dataclass
class CallCounts:
    """The calls one agent made through its backend, and the seconds they took."""

    gets: int = 0
    sets: int = 0
    conflicts: int = 0
    waits: int = 0
    get_seconds: float = 0.0
    set_seconds: float = 0.0
    wait_seconds: float = 0.0

    @property
    def calls(self) -> int:
        """get_state and set_state calls (waits for a change are not backend calls of torch's)."""
        return self.gets + self.sets

    @property
    def call_seconds(self) -> float:
        return self.get_seconds + self.set_seconds


class CountingBackend(RendezvousBackend):
    """Delegates to ``inner`` and counts and times each call.

    Thread-safe (torch's handler also calls from its heartbeat thread). A ``set_state`` that
    returns ``has_set=False`` counts as a conflict. ``wait_for_change`` (etcd-v3's, which the
    ``wait=watch`` handler calls) is forwarded and timed, but is not a backend call of torch's.
    """

    def __init__(self, inner: RendezvousBackend) -> None:
        self.inner = inner
        self.counts = CallCounts()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.inner.name

    def reset(self) -> CallCounts:
        """Start counting afresh; return what was counted so far."""
        with self._lock:
            counts, self.counts = self.counts, CallCounts()
        return counts

    def snapshot(self) -> CallCounts:
        with self._lock:
            return dataclasses.replace(self.counts)

    def get_state(self) -> tuple[bytes, Token] | None:
        started = time.perf_counter()
        try:
            return self.inner.get_state()
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.counts.gets += 1
                self.counts.get_seconds += elapsed

    def set_state(self, state: bytes, token: Token | None = None
                  ) -> tuple[bytes, Token, bool] | None:
        started = time.perf_counter()
        result = None
        try:
            result = self.inner.set_state(state, token)
            return result
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.counts.sets += 1
                self.counts.set_seconds += elapsed
                if result is not None and not result[2]:
                    self.counts.conflicts += 1

    def wait_for_change(self, token: Token | None, timeout: float) -> bool:
        wait = getattr(self.inner, "wait_for_change", None)
        if wait is None:
            raise AttributeError(f"The {self.inner.name} backend cannot wait for a change.")
        started = time.perf_counter()
        try:
            return bool(wait(token, timeout))
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                self.counts.waits += 1
                self.counts.wait_seconds += elapsed


@contextlib.contextmanager
def backend_for(kind: str, endpoint: str, run_id: str,
                config: Mapping[str, object] | None = None) -> Iterator[RendezvousBackend]:
    """A backend of ``kind`` for one run, closed afterwards."""
    backend, _store = create_backend(kind, parameters(kind, endpoint, run_id, config=config))
    try:
        yield backend
    finally:
        close_backend(backend)
