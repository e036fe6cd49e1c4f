"""Every error etcd_rdzv raises, in one module. None of them needs torch.

Read this module to learn what can go wrong. The hierarchy::

    EtcdRendezvousError
    ├── EtcdConnectionError          etcd did not do what was asked
    │   ├── TransientError           ... for a cause that can pass by waiting
    │   │   └── UnavailableError     unreachable, no answer in time, leader changing
    │   ├── LeaseNotFoundError       a write named a lease etcd no longer has
    │   ├── EtcdTLSError             TLS is misconfigured: retrying cannot help
    │   └── EtcdAuthError            credentials or permissions refused
    ├── EtcdStateError               a stored value cannot be decoded or stored
    │   ├── NotATorchStateError      ... it is no torch rendezvous state at all
    │   └── StateTooLargeError
    ├── CompactedError               a watch asked for history etcd has compacted
    ├── StoreTimeoutError            a store get/wait ran out of time
    ├── RunNotFoundError             a run has no state (also a LookupError)
    ├── HandlerMismatchError         a run is driven by the other rendezvous handler
    ├── RunClosedError               the run is closed: it admits no node
    │   └── StandbyExitError         ... and this node only stood by: it may exit cleanly
    └── JoinTimeoutError             no round admitted this node within join_timeout
    EtcdStartError                   the test harness could not start etcd (RuntimeError)

**Transient or permanent.** A :class:`TransientError` can heal by waiting (etcd is
unreachable, did not answer in time, has no leader): code that waits, retries, or keeps going
through an outage catches :class:`TransientError` and nothing wider. Every other
:class:`EtcdConnectionError` is permanent: a refused credential or permission, a TLS
misconfiguration, a lease etcd no longer has, etcd out of space, a watch etcd canceled for
a reason that does not pass, a forked process that cannot use gRPC. Waiting does not cure
those, so they surface at once with their own message, whatever deadline is left.

The torch face maps them onto torch's classes in one function,
:func:`etcd_rdzv.elastic._portal.run_for_torch`: :class:`EtcdConnectionError` becomes
``RendezvousConnectionError``, :class:`EtcdStateError` ``RendezvousStateError``,
:class:`RunClosedError` ``RendezvousClosedError``, :class:`StandbyExitError`
``RendezvousGracefulExitError``, :class:`JoinTimeoutError` ``RendezvousTimeoutError`` and
:class:`StoreTimeoutError` ``DistStoreError``.
"""

from __future__ import annotations

__all__ = [
    "CompactedError",
    "EtcdAuthError",
    "EtcdConnectionError",
    "EtcdRendezvousError",
    "EtcdStartError",
    "EtcdStateError",
    "EtcdTLSError",
    "HandlerMismatchError",
    "JoinTimeoutError",
    "LeaseNotFoundError",
    "NotATorchStateError",
    "RunClosedError",
    "RunNotFoundError",
    "StandbyExitError",
    "StateTooLargeError",
    "StoreTimeoutError",
    "TransientError",
    "UnavailableError",
]


class EtcdRendezvousError(Exception):
    """Base class of every error raised by etcd_rdzv (except the test harness's)."""


class EtcdConnectionError(EtcdRendezvousError):
    """etcd did not do what was asked: it could not be reached, did not answer within the
    operation's deadline, or refused (see the subclasses).

    Only a :class:`TransientError` can pass by waiting; the others are permanent. A write
    that ends with this error may or may not have been applied: read the state to find out.
    """


class TransientError(EtcdConnectionError):
    """etcd could not be reached or did not answer in time, for a cause that can pass by
    waiting (a member down, a network partition, a leader election, an overloaded cluster).

    Raised when the operation's retries are spent. A loop that waits for something may
    catch it and go on; a write that ends with it may or may not have been applied.
    """


class UnavailableError(TransientError):
    """An attempt failed in a way that may pass (UNAVAILABLE, DEADLINE_EXCEEDED, no leader,
    a broken watch stream), or every attempt did until the deadline.

    For a write the outcome is unknown: it may have been applied.
    """


class LeaseNotFoundError(EtcdConnectionError):
    """A write named a lease etcd does not have (expired, revoked, or lost in a restore).

    The write was not applied. Permanent: the lease will not come back; grant a new one.
    """


class EtcdTLSError(EtcdConnectionError):
    """The TLS setup cannot work (wrong CA, missing client certificate, plaintext against a
    TLS port, an unreadable certificate file): failing at once, since retrying cannot help."""


class EtcdAuthError(EtcdConnectionError):
    """etcd refused the credentials, or the user may not access the key prefix.

    Permanent: an operator must change the credentials or grant the role.
    """


class EtcdStateError(EtcdRendezvousError):
    """A stored value cannot be decoded, or a state cannot be stored."""


class NotATorchStateError(EtcdStateError):
    """The value is not a pickle of torch's rendezvous state at all: it does not unpickle and
    does not name torch's state, or it holds another object. Another program wrote the key.
    """


class StateTooLargeError(EtcdStateError):
    """A state does not fit etcd's request size limit, even compressed. Nothing was sent."""


class CompactedError(EtcdRendezvousError):
    """A watch or a read asked for history that etcd has compacted away (read the key at the
    current revision instead); or a compaction asked for a revision compacted already."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        #: The oldest revision etcd still has (0 when etcd did not say).
        self.compact_revision = compact_revision


class StoreTimeoutError(EtcdRendezvousError):
    """A store ``get`` or ``wait`` ended before every key it waited for was set."""


class RunNotFoundError(EtcdRendezvousError, LookupError):
    """The run has no state in etcd (never created, expired, or deleted)."""


class HandlerMismatchError(EtcdRendezvousError):
    """A node joined a run that another rendezvous handler (``handler=torch`` against
    ``handler=native``) already drives: the two protocols cannot share a run."""


class RunClosedError(EtcdRendezvousError):
    """The run is closed (a node shut down, or an operator closed it): it admits no node."""


class StandbyExitError(RunClosedError):
    """The run was closed while this node stood by beyond ``max_nodes``: nothing needs it,
    and it may exit cleanly."""


class JoinTimeoutError(EtcdRendezvousError):
    """No round admitted this node within ``join_timeout``."""


class EtcdStartError(RuntimeError):
    """The test harness (:mod:`etcd_rdzv.testing`) could not start etcd, or etcd did not
    answer; the message carries its log's tail."""

