"""A native run as a whole: closing it, and one protocol per run.

A run is driven by one handler: torch's (a state key) or the native one (keys under
``native/``). Each side refuses the other's run with :class:`HandlerMismatchError`, which
names both handlers and the option that picks one.
"""

from __future__ import annotations

from aetcd import rpc, utils

from .._connection import EtcdClient
from ..config import DEFAULT_TTL
from ..deadline import Deadline
from ..errors import HandlerMismatchError
from ..keys import RunKeys
from .session import RunLease

__all__ = ["close_native_run", "refuse_native_run", "torch_run_error"]


async def close_native_run(client: EtcdClient, keys: RunKeys, deadline: Deadline, *,
                           ttl: int = DEFAULT_TTL, closed_by: bytes = b"operator") -> None:
    """Close a native run (from a node, or from outside it): waiting nodes get
    :class:`~etcd_rdzv.errors.RunClosedError`, standbys
    :class:`~etcd_rdzv.errors.StandbyExitError`. The ``closed`` key lives on the run lease,
    so it expires with the run's other shared keys."""
    await RunLease(client, keys, ttl).write(
        lambda lease: client.put(keys.closed, closed_by, lease, deadline), deadline)


def torch_run_error(keys: RunKeys) -> HandlerMismatchError:
    """What a native node says when torch's handler drives its run."""
    return HandlerMismatchError(
        f"The run {keys.run_id!r} is driven by handler=torch (its state key "
        f"{keys.state.decode()!r} exists); this node uses handler=native. Give every node of "
        "a run the same --rdzv-conf handler=..., or use another --rdzv-id.")


async def refuse_native_run(client: EtcdClient, keys: RunKeys, deadline: Deadline) -> None:
    """For torch's handler: raise if the run is a native one (one run, one protocol).

    Raises:
        HandlerMismatchError: the run has native keys.
    """
    response = await client.range(rpc.RangeRequest(
        key=keys.native_prefix, range_end=utils.prefix_range_end(keys.native_prefix),
        count_only=True), deadline, f"Reading {keys.native_prefix.decode()!r}")
    if response.count:
        raise HandlerMismatchError(
            f"The run {keys.run_id!r} is driven by handler=native (it has keys under "
            f"{keys.native_prefix.decode()!r}); this node uses handler=torch. Give every node "
            "of a run the same --rdzv-conf handler=..., or use another --rdzv-id.")
