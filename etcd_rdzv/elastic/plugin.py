"""``create_backend`` and the torchrun plug-in ``--rdzv-backend=etcd-v3``.

torch imports this module (through the ``torchrun.handlers`` entry point) whenever
``torch.distributed.elastic.rendezvous`` is imported, so its top level imports nothing heavy:
grpc and the core load when a handler is first created.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch._C._distributed_c10d import Store
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

    from ..config import RendezvousConfig
    from .backend import EtcdRendezvousBackend

__all__ = ["create_backend", "create_handler", "handler_factory"]

#: torch's handler options that the native handler reads from ``--rdzv-conf``.
_NATIVE_OPTIONS = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
                   "keep_alive_interval", "keep_alive_max_attempt")


def create_backend(params: RendezvousParameters) -> tuple[EtcdRendezvousBackend, Store]:
    """Create the etcd-v3 backend and its store from torch's rendezvous parameters.

    ``params.endpoint`` holds one or more ``host[:port]`` entries separated by commas (IPv6
    as ``[addr]:port``, default port 2379). ``params.config`` takes torch's ``etcd-v2``
    options (``read_timeout``, ``protocol``, ``ssl_cert``, ``ssl_cert_key``, ``ca_cert``, same
    defaults) and ``key_prefix``, ``ttl``, ``username``, ``password_file``,
    ``request_timeout``, ``connect_timeout``, ``compress_threshold``, ``max_request_bytes``,
    ``conflict_backoff``, ``wait``, ``compact_interval``, ``verify_state``: see
    docs/configuration.md (``BACKEND_OPTIONS`` in :mod:`etcd_rdzv.config` lists them). The
    password comes from ``password_file`` or ``$ETCD_RDZV_PASSWORD``, never from the command
    line.

    Raises:
        ValueError: an option is invalid; the message names it and its value.
        RendezvousConnectionError: etcd did not answer within ``connect_timeout`` (at most
            ``read_timeout``); the message names the endpoints.
    """
    from ..config import RendezvousConfig

    config = RendezvousConfig.from_options(params.endpoint, params.run_id, params.config)
    return _create_backend(config)


def _create_backend(config: RendezvousConfig) -> tuple[EtcdRendezvousBackend, Store]:
    """:func:`create_backend` from options already parsed."""
    from .._connection import EtcdClient
    from ..backend import AsyncEtcdRendezvousBackend
    from ..deadline import Deadline
    from ..keys import RunKeys
    from ..native import refuse_native_run
    from ..store import AsyncEtcdStore
    from ._portal import run_for_torch
    from .backend import EtcdRendezvousBackend
    from .store import EtcdStore

    client = EtcdClient(config.etcd)
    core = AsyncEtcdRendezvousBackend.from_config(client, config)
    keys = RunKeys(config.run_id, config.key_prefix)
    # One read: etcd answers, and the run is not a native one.
    probe_seconds = config.etcd.probe_timeout
    run_for_torch(refuse_native_run(client, keys, Deadline.after(probe_seconds)), probe_seconds)
    return EtcdRendezvousBackend(core), EtcdStore(AsyncEtcdStore(client, keys.store_prefix,
                                                                 core.lease))


def _create_native_handler(config: RendezvousConfig,
                           params: RendezvousParameters) -> RendezvousHandler:
    """The native handler (``handler=native``) from options already parsed."""
    from .._connection import EtcdClient
    from ..keys import RunKeys
    from ..native import AsyncNativeRendezvous, NativeSettings, NodeId, RunLease
    from ..store import AsyncEtcdStore
    from ._portal import run_for_torch
    from .handler import NativeRendezvousHandler
    from .store import EtcdStore

    settings = NativeSettings(
        min_nodes=params.min_nodes, max_nodes=params.max_nodes, ttl=config.ttl,
        **{name: params.config[name] for name in _NATIVE_OPTIONS if name in params.config})
    client = EtcdClient(config.etcd)
    keys = RunKeys(config.run_id, config.key_prefix)
    rendezvous = AsyncNativeRendezvous(client, keys, settings,
                                       NodeId.generate(params.local_addr))
    probe_seconds = config.etcd.probe_timeout
    run_for_torch(rendezvous.start(), probe_seconds)
    # The store's keys (MASTER_ADDR, the agents' barriers) live on the run lease: as long as
    # a node of the run lives, however long it trains without writing.
    store = EtcdStore(AsyncEtcdStore(client, keys.store_prefix,
                                     RunLease(client, keys, config.ttl)))
    return NativeRendezvousHandler(rendezvous, store)


def create_handler(params: RendezvousParameters) -> RendezvousHandler:
    """The rendezvous handler ``params.config["handler"]`` names, over etcd.

    ``handler=torch`` (the default): torch's ``DynamicRendezvousHandler`` over the etcd-v3
    backend and store, whose ``num_nodes_waiting()`` survives an etcd outage
    (:mod:`~etcd_rdzv.elastic.torch_handler`). ``handler=native``:
    :class:`~etcd_rdzv.elastic.handler.NativeRendezvousHandler`, the native protocol of
    :mod:`etcd_rdzv.native`.

    Every handler option of torch (``join_timeout``, ``last_call_timeout``,
    ``close_timeout``, ``heartbeat_timeout``, ``keep_alive_interval``,
    ``keep_alive_max_attempt``) passes through ``params.config``, beside the backend's.

    With ``wait=watch`` the handler waits on etcd watches instead of torch's fixed 1 s
    poll (:func:`etcd_rdzv.elastic.fast_handler.create_fast_handler`; on an untested torch
    it warns once and is torch's stock handler). With ``wait=poll``, the default, it is
    torch's stock handler.
    """
    from ..config import RendezvousConfig

    config = RendezvousConfig.from_options(params.endpoint, params.run_id, params.config)
    if config.handler == "native":
        return _create_native_handler(config, params)
    backend, store = _create_backend(config)
    try:
        from .torch_handler import create_torch_handler

        return create_torch_handler(store, backend, params, watch=config.wait == "watch")
    except BaseException:
        # torch refused a handler option: nothing will use the connection just opened.
        with contextlib.suppress(Exception):
            backend.close()
        raise


def handler_factory() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """The ``torchrun.handlers`` entry point: torch calls it and registers what it returns."""
    return create_handler
