"""fork: the child never touches its parent's loop thread or gRPC channel."""

from __future__ import annotations

import os
import sys
import uuid

import pytest
from torch.distributed.elastic.rendezvous import RendezvousParameters

from etcd_rdzv.elastic import create_backend
from etcd_rdzv.testing import EtcdServer

CHILD_SAW_CLEAR_ERROR = 3
CHILD_SAW_SOMETHING_ELSE = 4


def params(endpoint: str) -> RendezvousParameters:
    return RendezvousParameters("etcd-v3", endpoint, f"fork-{uuid.uuid4().hex[:6]}", 1, 1,
                                read_timeout="5")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_forked_child_fails_fast_and_the_parent_keeps_working(etcd_server: EtcdServer) -> None:
    backend, _ = create_backend(params(etcd_server.get_endpoint()))
    written = backend.set_state(b"parent")
    assert written is not None
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code, never return into pytest
        code = CHILD_SAW_SOMETHING_ELSE
        try:
            backend.get_state()
        except Exception as exc:
            if "forked" in str(exc) and "spawn" in str(exc):
                code = CHILD_SAW_CLEAR_ERROR
        try:
            create_backend(params(etcd_server.get_endpoint()))
            code = CHILD_SAW_SOMETHING_ELSE
        except Exception as exc:
            if "forked" not in str(exc):
                code = CHILD_SAW_SOMETHING_ELSE
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == CHILD_SAW_CLEAR_ERROR
    # The child shared the parent's sockets; the parent's connection must be intact.
    assert backend.get_state() == (b"parent", written[1])
    assert backend.set_state(b"after fork", written[1]) is not None
    backend.close()
