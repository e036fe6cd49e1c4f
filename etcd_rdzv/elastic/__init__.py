"""The adapter to ``torch.distributed.elastic``: the only part of etcd_rdzv that imports torch.

Names load lazily, so that torch's plug-in discovery (which imports
:mod:`etcd_rdzv.elastic.plugin`) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import EtcdRendezvousBackend
    from .plugin import create_backend, create_handler
    from .store import EtcdStore

__all__ = ["EtcdRendezvousBackend", "EtcdStore", "create_backend", "create_handler"]

_WHERE = {
    "EtcdRendezvousBackend": ".backend",
    "EtcdStore": ".store",
    "create_backend": ".plugin",
    "create_handler": ".plugin",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
