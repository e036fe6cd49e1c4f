"""The simulation's virtual clock: a queue of callbacks run in time order, one at a time.

Nothing waits for real time: :meth:`Clock.run` pops the earliest callback, sets
:attr:`Clock.now` to its time and calls it. Callbacks at one time run in the order they were
scheduled, so a seed replays the same history, event for event.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

__all__ = ["Clock"]


class Clock:
    """Virtual seconds and the callbacks due at them."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        """Callbacks run so far (the simulation's measure of work)."""
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._stopped = False

    def at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at ``when`` (at once, after the callbacks already due, if past)."""
        heapq.heappush(self._queue, (max(when, self.now), next(self._order), callback))

    def after(self, delay: float, callback: Callable[[], None]) -> None:
        self.at(self.now + delay, callback)

    def stop(self) -> None:
        """End :meth:`run` after the current callback."""
        self._stopped = True

    def run(self) -> None:
        """Run callbacks until :meth:`stop` or none is left."""
        queue = self._queue
        while queue and not self._stopped:
            when, _, callback = heapq.heappop(queue)
            self.now = when
            self.events += 1
            callback()
