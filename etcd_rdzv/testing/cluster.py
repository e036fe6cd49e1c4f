"""Real etcd servers for tests, demos and benchmarks: loopback, free ports, temporary data.

Only the v3 API is served. :class:`EtcdServer` has the surface of torch's ``EtcdServer``
(``start``, ``stop``, ``get_host``, ``get_port``, ``get_endpoint``) plus a context manager;
:class:`EtcdCluster` starts three members (or more) that form one cluster, and can kill,
pause, resume and restart each of them. A start that fails is retried on fresh ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..config import EtcdConfig, parse_endpoints
from ..errors import EtcdStartError
from ._certs import TlsCertificates
from .member import EtcdMember, find_etcd_binary

__all__ = ["EtcdCluster", "EtcdServer"]

_Cluster = TypeVar("_Cluster", bound="EtcdCluster")


class EtcdCluster:
    """``size`` etcd members on loopback that form one cluster.

    Args:
        size: the number of members (1 for a single server).
        host: the loopback address to listen on.
        extra_args: more ``etcd`` flags for every member (``--auth-token-ttl=2``, ...).
        data_dir: where member data goes; a temporary directory, removed on ``stop``, if None.
        tls: serve clients over TLS with these certificates (:func:`make_certificates`).
        client_cert_auth: with ``tls``, also require client certificates signed by its CA.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        data_dir: str | os.PathLike[str] | None = None,
        tls: TlsCertificates | None = None,
        client_cert_auth: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"An etcd cluster needs at least one member, got size={size}.")
        self._own_dir = data_dir is None
        self._base_dir = Path(data_dir) if data_dir is not None else \
            Path(tempfile.mkdtemp(prefix="etcd-rdzv-"))
        self._host = host
        self._extra_args = tuple(extra_args)
        self._root_password: str | None = None
        self.members = [
            EtcdMember(f"member{i}", host, self._base_dir / f"member{i}", tls, client_cert_auth)
            for i in range(size)
        ]

    def get_endpoint(self) -> str:
        """Every member's ``host:port``, comma-separated: the form ``--rdzv-endpoint`` takes."""
        return ",".join(member.endpoint for member in self.members)

    def client_config(self, **options: Any) -> EtcdConfig:
        """An :class:`~etcd_rdzv.EtcdConfig` naming every member, with ``options`` set."""
        return EtcdConfig(endpoints=parse_endpoints(self.get_endpoint()), **options)

    def _initial_cluster(self) -> str:
        return ",".join(f"{member.name}={member.peer_url}" for member in self.members)

    def start(self, timeout: float = 60.0, num_retries: int = 3) -> None:
        """Start every member and return once each answers a v3 request.

        Retries with fresh ports when a start fails (a port taken in between, say).

        Raises:
            EtcdStartError: no start succeeded; the message carries the logs' tails.
        """
        binary = find_etcd_binary()
        error: EtcdStartError | None = None
        for _ in range(max(1, num_retries)):
            for member in self.members:
                member.pick_ports()
                shutil.rmtree(member.data_dir, ignore_errors=True)
            cluster = self._initial_cluster()
            for member in self.members:
                member.launch(binary, cluster, "new", self._extra_args)
            try:
                self._wait_ready(self.members, timeout)
                return
            except EtcdStartError as exc:
                error = exc
                for member in self.members:
                    member.stop()
        assert error is not None
        raise error

    @staticmethod
    def _wait_ready(members: Sequence[EtcdMember], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            for member in list(pending):
                if not member.running:
                    raise EtcdStartError(f"etcd {member.name} exited while starting:\n"
                                         f"{member.log_tail()}")
                if member.answers(0.5):
                    pending.remove(member)
            if pending and time.monotonic() > deadline:
                raise EtcdStartError(
                    f"etcd {pending[0].name} did not answer within {timeout:g} s:\n"
                    f"{pending[0].log_tail()}"
                )
            if pending:
                time.sleep(0.05)

    def leader_index(self, timeout: float = 10.0) -> int:
        """The index of the member that is leader now, waiting up to ``timeout`` for one."""
        deadline = time.monotonic() + timeout
        while True:
            for index, member in enumerate(self.members):
                if member.is_leader():
                    return index
            if time.monotonic() > deadline:
                raise EtcdStartError(f"No etcd member is leader after {timeout:g} s.")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """Kill member ``index`` at once (SIGKILL); its data stays for :meth:`restart`."""
        self.members[index].kill()

    def pause(self, index: int) -> None:
        """Freeze member ``index`` (SIGSTOP): hung, not dead."""
        self.members[index].signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        """Thaw a paused member (SIGCONT)."""
        self.members[index].signal(signal.SIGCONT)

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Start a killed or stopped member again on its old ports and data."""
        member = self.members[index]
        member.stop()
        member.launch(find_etcd_binary(), self._initial_cluster(), "existing", self._extra_args)
        self._wait_ready([member], timeout)

    def _auth_call(self, method: str, request: Any) -> Any:
        """One Auth RPC on the first live member, as root once auth is enabled."""
        from aetcd import rpc

        member = next(m for m in self.members if m.running)
        with member.channel() as channel:
            stub = rpc.AuthStub(channel)
            metadata: tuple[tuple[str, str], ...] = ()
            if self._root_password is not None:
                token = stub.Authenticate(
                    rpc.AuthenticateRequest(name="root", password=self._root_password), timeout=5
                ).token
                metadata = (("token", token),)
            return getattr(stub, method)(request, timeout=5, metadata=metadata)

    def enable_auth(self, root_password: str) -> None:
        """Create ``root`` with ``root_password`` and turn authentication on."""
        from aetcd import rpc

        self._auth_call("UserAdd", rpc.AuthUserAddRequest(name="root", password=root_password))
        self._auth_call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        self._auth_call("AuthEnable", rpc.AuthEnableRequest())
        self._root_password = root_password

    def add_user(self, name: str, password: str, prefix: str) -> None:
        """Create user ``name`` with read-write access to keys under ``prefix`` only."""
        from aetcd import rpc, utils

        role = f"{name}-role"
        self._auth_call("UserAdd", rpc.AuthUserAddRequest(name=name, password=password))
        self._auth_call("RoleAdd", rpc.AuthRoleAddRequest(name=role))
        self._auth_call("RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(
            name=role,
            perm=rpc.Permission(permType=rpc.Permission.READWRITE, key=prefix.encode(),
                                range_end=utils.prefix_range_end(prefix.encode())),
        ))
        self._auth_call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=name, role=role))

    def stop(self) -> None:
        """Stop every member and remove the data, if this object created it."""
        for member in self.members:
            member.stop()
        if self._own_dir:
            shutil.rmtree(self._base_dir, ignore_errors=True)

    def log_tail(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log_tail()}" for m in self.members)

    def __enter__(self: _Cluster) -> _Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()  # the data directory goes too
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EtcdServer(EtcdCluster):
    """One etcd member on loopback, with the surface of torch's ``EtcdServer``.

    ``client_port`` 0 picks a free port; any other value is the exact port etcd serves
    clients on, and :meth:`start` raises :class:`EtcdStartError` naming it if it is taken.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        tls: TlsCertificates | None = None,
        client_cert_auth: bool = False,
        client_port: int = 0,
    ) -> None:
        if not 0 <= client_port <= 65535:
            raise ValueError(f"client_port must be 0 (a free port) or a TCP port, "
                             f"got client_port={client_port}.")
        super().__init__(1, host=host, extra_args=extra_args, data_dir=data_dir, tls=tls,
                         client_cert_auth=client_cert_auth)
        self.member.requested_client_port = client_port

    def start(self, timeout: float = 60.0, num_retries: int = 3, stderr: object = None) -> None:
        """Start etcd; ``stderr`` is accepted for torch compatibility (the log is kept)."""
        super().start(timeout, num_retries)

    def get_host(self) -> str:
        return self._host

    def get_port(self) -> int:
        return self.member.client_port

    def get_endpoint(self) -> str:
        return self.member.endpoint

    @property
    def member(self) -> EtcdMember:
        return self.members[0]
