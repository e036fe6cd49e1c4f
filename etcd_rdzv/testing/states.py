"""Torch rendezvous states for tests and benchmarks: realistic ones (needs torch), and the
pickle an attacker would store instead.
"""

from __future__ import annotations

import builtins
import datetime
import pickle
import random
from pathlib import Path
from typing import Any

__all__ = ["WritesMarker", "torch_state"]


def torch_state(nodes: int, *, seed: int | None = None) -> bytes:
    """A pickled ``_RendezvousState`` as torch's handler writes it for ``nodes`` participants.

    Each node gets its own heartbeat timestamp: a state built with one shared ``datetime``
    pickles much smaller than a real one (pickle memoises the shared object).
    """
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        _NodeDesc,
        _RendezvousState,
    )

    state = _RendezvousState()
    state.round, state.complete = 7, True
    now = datetime.datetime.now(datetime.timezone.utc)
    rng = random.Random(nodes if seed is None else seed)
    for index in range(nodes):
        node = _NodeDesc(f"node-{index:06d}.cluster.example.com", 10_000 + index, 0)
        state.participants[node] = index
        state.last_heartbeats[node] = now - datetime.timedelta(microseconds=rng.randrange(10**7))
    return pickle.dumps(state)


class WritesMarker:
    """Unpickles as ``exec`` of code that writes ``ran`` to ``marker``: what an attacker with
    write access to the state key would store. A test checks that ``marker`` stays absent."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self) -> tuple[Any, ...]:
        return builtins.exec, (self.code,)
