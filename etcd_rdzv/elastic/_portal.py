"""One event-loop thread per process, on which the sync faces run the async core, and the
one map from this project's errors to torch's (:func:`run_for_torch`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

from ..errors import (
    CompactedError,
    EtcdConnectionError,
    EtcdStateError,
    HandlerMismatchError,
    JoinTimeoutError,
    RunClosedError,
    StandbyExitError,
    StoreTimeoutError,
)

__all__ = ["Portal", "run_for_torch"]

T = TypeVar("T")

#: Beyond the core's own deadline, so that the core's error (which says more) wins.
_PORTAL_GRACE = 5.0


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

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coroutine`` on the loop thread and return its result.

        The coroutine is cancelled if ``timeout`` seconds pass (raising :class:`TimeoutError`;
        None: no limit, the coroutine keeps its own deadlines) or if the waiting thread is
        interrupted.
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


def run_for_torch(coroutine: Coroutine[Any, Any, T], seconds: float | None) -> T:
    """Run ``coroutine`` on this process's portal for the torch faces, mapping errors once:

    * :class:`~etcd_rdzv.errors.StoreTimeoutError` → ``torch.distributed.DistStoreError``
      (what torch's agent catches around its store barriers);
    * :class:`~etcd_rdzv.errors.EtcdConnectionError`, or no answer within ``seconds`` plus a
      grace → ``RendezvousConnectionError``;
    * :class:`~etcd_rdzv.errors.EtcdStateError`, and
      :class:`~etcd_rdzv.errors.CompactedError` (a past revision a rendezvous needed is
      gone) → ``RendezvousStateError``;
    * :class:`~etcd_rdzv.errors.StandbyExitError` → ``RendezvousGracefulExitError``, other
      :class:`~etcd_rdzv.errors.RunClosedError` → ``RendezvousClosedError``;
    * :class:`~etcd_rdzv.errors.JoinTimeoutError` → ``RendezvousTimeoutError``;
    * :class:`~etcd_rdzv.errors.HandlerMismatchError` → ``RendezvousError``.

    ``seconds`` is the deadline the coroutine keeps itself (``read_timeout``, plus the
    store's wait); the portal's own timeout only catches a coroutine that fails to. None:
    the coroutine may wait without a limit (a standby node).
    """
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.rendezvous.api import (
        RendezvousClosedError,
        RendezvousConnectionError,
        RendezvousError,
        RendezvousGracefulExitError,
        RendezvousStateError,
        RendezvousTimeoutError,
    )

    try:
        return Portal.get().run(coroutine, None if seconds is None else seconds + _PORTAL_GRACE)
    except StoreTimeoutError as exc:
        raise DistStoreError(str(exc)) from exc
    except (EtcdConnectionError, TimeoutError) as exc:
        raise RendezvousConnectionError(f"The connection to etcd has failed: {exc}") from exc
    except (EtcdStateError, CompactedError) as exc:
        raise RendezvousStateError(str(exc)) from exc
    except StandbyExitError as exc:
        raise RendezvousGracefulExitError(str(exc)) from exc
    except RunClosedError as exc:
        raise RendezvousClosedError(str(exc)) from exc
    except JoinTimeoutError as exc:
        raise RendezvousTimeoutError(str(exc)) from exc
    except HandlerMismatchError as exc:
        raise RendezvousError(str(exc)) from exc
