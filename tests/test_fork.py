"""fork: the child never touches its parent's loop thread or gRPC channel.

The scenario runs in a fresh interpreter: a process that holds a backend forks. (Forking
the pytest process itself, which has run many event loops and thread pools, can crash
inside CPython's own after-fork thread bookkeeping before any of our code runs.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from etcd_rdzv.testing import EtcdServer

SCENARIO = textwrap.dedent("""
    import os, sys
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from etcd_rdzv.elastic import create_backend

    def params():
        return RendezvousParameters("etcd-v3", sys.argv[1], "fork", 1, 1, read_timeout="5",
                                    key_prefix=sys.argv[2])

    backend, _ = create_backend(params())
    written = backend.set_state(b"parent")
    pid = os.fork()
    if pid == 0:
        outcome = []
        for attempt in (backend.get_state, lambda: create_backend(params())):
            try:
                attempt()
                outcome.append("worked")
            except Exception as exc:
                outcome.append("clear" if "forked" in str(exc) and "spawn" in str(exc)
                               else repr(exc))
        os.write(1, ("child " + " ".join(outcome) + "\\n").encode())
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status))
    print("parent get", backend.get_state() == (b"parent", written[1]))
    print("parent set", backend.set_state(b"after", written[1])[2])
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_forked_child_fails_fast_and_the_parent_keeps_working(
    etcd_server: EtcdServer, key_prefix: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCENARIO, etcd_server.get_endpoint(), key_prefix],
        capture_output=True, text=True, timeout=60,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0, result.stderr[-2000:]
    assert lines == ["child clear clear", "child exit 0", "parent get True", "parent set True"]
