"""The torchrun plug-in: the name resolves through torch's registry; imports stay light."""

from __future__ import annotations

import subprocess
import sys

from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

from etcd_rdzv.testing import EtcdServer


def test_etcd_v3_resolves_through_torchs_own_registry(etcd_server: EtcdServer,
                                                      key_prefix: str) -> None:
    params = RendezvousParameters(
        backend="etcd-v3", endpoint=etcd_server.get_endpoint(),
        run_id="plugin", min_nodes=1, max_nodes=2,
        key_prefix=key_prefix, join_timeout="7", last_call_timeout="3", close_timeout="4",
        keep_alive_interval="2", keep_alive_max_attempt="5",
    )
    handler = get_rendezvous_handler(params)
    assert isinstance(handler, DynamicRendezvousHandler)
    assert handler.get_backend() == "etcd-v3"  # the name of the backend it was built over
    settings = handler.settings
    assert (settings.timeout.join.total_seconds(), settings.timeout.last_call.total_seconds(),
            settings.timeout.close.total_seconds()) == (7, 3, 4)
    assert settings.keep_alive_interval.total_seconds() == 2
    assert settings.keep_alive_max_attempt == 5


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_importing_the_package_and_plugin_loads_neither_torch_nor_grpc() -> None:
    code = ("import sys, etcd_rdzv, etcd_rdzv.elastic.plugin; "
            "print('torch' in sys.modules, 'grpc' in sys.modules)")
    assert run_python(code) == "False False"


def test_the_async_core_imports_without_torch() -> None:
    code = ("import sys; from etcd_rdzv import AsyncEtcdRendezvousBackend, EtcdClient, "
            "EtcdConfig, AsyncEtcdStore; print('torch' in sys.modules)")
    assert run_python(code) == "False"
