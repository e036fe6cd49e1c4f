"""Real etcd for tests, demos and benchmarks, and the pieces tests share.

* :mod:`.cluster`: :class:`EtcdServer` (torch's ``EtcdServer`` surface) and
  :class:`EtcdCluster` (three members or more, with kill/pause/restart).
* :mod:`.member`: one etcd process, :func:`find_etcd_binary`, :func:`free_port`,
  :func:`port_is_free`.
* :mod:`._certs`: throwaway TLS certificates; :mod:`.fixtures`: the pytest fixtures;
  :mod:`.history`: the linearizability checker; :mod:`.states`: realistic torch states.

Importing this package starts nothing and imports neither grpc nor torch.
"""

from ..errors import EtcdStartError
from ._certs import TlsCertificates, make_certificates
from .cluster import EtcdCluster, EtcdServer
from .member import EtcdMember, find_etcd_binary, free_port, port_is_free

__all__ = [
    "EtcdCluster",
    "EtcdMember",
    "EtcdServer",
    "EtcdStartError",
    "TlsCertificates",
    "find_etcd_binary",
    "free_port",
    "make_certificates",
    "port_is_free",
]
