"""PyTorch elastic rendezvous over etcd v3.

* :class:`AsyncEtcdRendezvousBackend`: the async core, no torch needed.
* :class:`AsyncNativeRendezvous`: the native rendezvous (``handler=native``), no torch.
* :class:`EtcdRendezvousBackend`, :class:`EtcdStore`, :func:`create_backend`: the torch face
  (``pip install etcd-rdzv[torch]``).
* ``torchrun --rdzv-backend=etcd-v3``: the plug-in, registered on install.

Importing this package imports neither torch nor grpc: each name loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._connection import EtcdClient
    from .admin import (
        NativeEvent,
        NativeNodeView,
        NativeRunView,
        RendezvousAdmin,
        RunInfo,
        StateSnapshot,
    )
    from .backend import AsyncEtcdRendezvousBackend
    from .codec import StateCodec
    from .config import Endpoint, EtcdConfig, RendezvousConfig
    from .deadline import Deadline
    from .elastic.backend import EtcdRendezvousBackend
    from .elastic.plugin import create_backend, create_handler
    from .elastic.store import EtcdStore
    from .errors import (
        CompactedError,
        EtcdAuthError,
        EtcdConnectionError,
        EtcdRendezvousError,
        EtcdStateError,
        EtcdTLSError,
        HandlerMismatchError,
        JoinTimeoutError,
        LeaseNotFoundError,
        NotATorchStateError,
        RunClosedError,
        RunNotFoundError,
        StandbyExitError,
        StateTooLargeError,
        StoreTimeoutError,
        TransientError,
        UnavailableError,
    )
    from .keys import RunKeys
    from .native import Admission, AsyncNativeRendezvous, NativeSettings, NodeId
    from .state import NodeDesc, RendezvousStateView, decode_state, encode_closed
    from .store import AsyncEtcdStore

__version__ = "0.1.0"

_WHERE = {
    "AsyncEtcdRendezvousBackend": ".backend",
    "AsyncEtcdStore": ".store",
    "EtcdClient": "._connection",
    "StateCodec": ".codec",
    "Endpoint": ".config",
    "EtcdConfig": ".config",
    "RendezvousConfig": ".config",
    "EtcdRendezvousBackend": ".elastic.backend",
    "EtcdStore": ".elastic.store",
    "create_backend": ".elastic.plugin",
    "create_handler": ".elastic.plugin",
    "Deadline": ".deadline",
    "CompactedError": ".errors",
    "EtcdAuthError": ".errors",
    "EtcdConnectionError": ".errors",
    "EtcdRendezvousError": ".errors",
    "EtcdStateError": ".errors",
    "EtcdTLSError": ".errors",
    "HandlerMismatchError": ".errors",
    "JoinTimeoutError": ".errors",
    "LeaseNotFoundError": ".errors",
    "NotATorchStateError": ".errors",
    "RunClosedError": ".errors",
    "RunNotFoundError": ".errors",
    "StandbyExitError": ".errors",
    "RunKeys": ".keys",
    "Admission": ".native",
    "AsyncNativeRendezvous": ".native",
    "NativeSettings": ".native",
    "NodeId": ".native",
    "StateTooLargeError": ".errors",
    "StoreTimeoutError": ".errors",
    "TransientError": ".errors",
    "UnavailableError": ".errors",
    "RendezvousAdmin": ".admin",
    "NativeEvent": ".admin",
    "NativeNodeView": ".admin",
    "NativeRunView": ".admin",
    "RunInfo": ".admin",
    "StateSnapshot": ".admin",
    "NodeDesc": ".state",
    "RendezvousStateView": ".state",
    "decode_state": ".state",
    "encode_closed": ".state",
}

__all__ = [
    "Admission",
    "AsyncEtcdRendezvousBackend",
    "AsyncEtcdStore",
    "AsyncNativeRendezvous",
    "CompactedError",
    "Deadline",
    "Endpoint",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdConfig",
    "EtcdConnectionError",
    "EtcdRendezvousBackend",
    "EtcdRendezvousError",
    "EtcdStateError",
    "EtcdStore",
    "EtcdTLSError",
    "HandlerMismatchError",
    "JoinTimeoutError",
    "LeaseNotFoundError",
    "NativeEvent",
    "NativeNodeView",
    "NativeRunView",
    "NativeSettings",
    "NodeDesc",
    "NodeId",
    "NotATorchStateError",
    "RendezvousAdmin",
    "RendezvousConfig",
    "RendezvousStateView",
    "RunClosedError",
    "RunInfo",
    "RunKeys",
    "RunNotFoundError",
    "StandbyExitError",
    "StateCodec",
    "StateSnapshot",
    "StateTooLargeError",
    "StoreTimeoutError",
    "TransientError",
    "UnavailableError",
    "create_backend",
    "create_handler",
    "decode_state",
    "encode_closed",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
