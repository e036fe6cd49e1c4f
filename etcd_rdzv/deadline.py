"""The deadline of one operation, threaded through every etcd call it makes.

An operation (a ``get_state``, a store ``set``, a join) gets one :class:`Deadline` when it
starts, normally ``read_timeout`` seconds away. Every RPC attempt it makes is bounded by
``request_timeout`` and by what is left of that deadline, so retries never outlive it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["Deadline"]


@dataclass(frozen=True)
class Deadline:
    """A point in time (``time.monotonic``) by which an operation must end."""

    at: float
    """The monotonic time at which the operation must have ended."""
    seconds: float
    """The operation's whole budget, for messages ("did not complete within 30 s")."""

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return self.remaining() <= 0

    def attempt_timeout(self, request_timeout: float) -> float:
        """The deadline of the next RPC attempt; at least 1 ms so gRPC fails cleanly."""
        return max(0.001, min(request_timeout, self.remaining()))
