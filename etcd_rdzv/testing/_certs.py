"""Throwaway certificates for TLS tests, made with the ``openssl`` command at test time."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TlsCertificates", "make_certificates"]


@dataclass(frozen=True)
class TlsCertificates:
    """A CA, a server certificate for the given hosts, and a client certificate, as files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("TLS test certificates need the openssl command on PATH.")
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def make_certificates(
    directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
    *, client_name: str = "etcd-rdzv-client",
) -> TlsCertificates:
    """Make a fresh CA in ``directory`` and sign a server and a client certificate with it.

    The server certificate's subject alternative names are ``hosts`` (IPs and DNS names).
    Every call makes a new CA, so two directories give two CAs that do not trust each other.
    """
    directory.mkdir(parents=True, exist_ok=True)
    sans = ",".join(
        f"IP:{host}" if _is_ip(host) else f"DNS:{host}" for host in hosts
    )
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=etcd-rdzv-test-ca",
             cwd=directory)
    for name, subject, extension in (
        ("server", "/CN=etcd-rdzv-server",
         f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", f"/CN={client_name}", "extendedKeyUsage=clientAuth\n"),
    ):
        (directory / f"{name}.ext").write_text(extension)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", "-subj", subject, cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem",
                 "-extfile", f"{name}.ext", cwd=directory)
    return TlsCertificates(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
