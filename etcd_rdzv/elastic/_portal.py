"""One event-loop thread per process, on which the sync faces run the async core."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

__all__ = ["Portal"]

T = TypeVar("T")


class Portal:
    """Runs coroutines on a daemon thread's event loop and waits for them from any thread.

    There is one portal per process (:meth:`get`), shared by every backend and store, so that
    they share one gRPC channel per client. A forked child never uses its parent's portal:
    the thread did not survive the fork, and :meth:`get` starts a fresh one.
    """

    _current: ClassVar[Portal | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()
    #: Portals inherited through fork; never freed, since their loop's resources are shared.
    _inherited: ClassVar[list[Portal]] = []

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="etcd-rdzv-loop", daemon=True
        )
        self._thread.start()

    @classmethod
    def get(cls) -> Portal:
        """This process's portal, started on first use."""
        portal = cls._current
        if portal is not None and portal._pid == os.getpid():
            return portal
        with cls._lock:
            if cls._current is None or cls._current._pid != os.getpid():
                cls._current = Portal()
            return cls._current

    @classmethod
    def _forget_after_fork(cls) -> None:
        # The lock may have been held by another parent thread at fork time.
        cls._lock = threading.Lock()
        if cls._current is not None:
            cls._inherited.append(cls._current)
        cls._current = None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coroutine`` on the loop thread and return its result.

        The coroutine is cancelled if ``timeout`` seconds pass (raising :class:`TimeoutError`)
        or if the waiting thread is interrupted.
        """
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("A sync etcd_rdzv call was made from its own event-loop thread; "
                               "await the async API there instead.")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"The etcd operation did not finish within {timeout:g} s.") \
                from None
        except BaseException:
            future.cancel()
            raise


os.register_at_fork(after_in_child=Portal._forget_after_fork)
