"""The errors of the async core. None of them needs torch.

The torch face (:mod:`etcd_rdzv.elastic`) maps them onto torch's classes in one place:
:class:`EtcdConnectionError` becomes ``RendezvousConnectionError`` and
:class:`EtcdStateError` becomes ``RendezvousStateError``.
"""

from __future__ import annotations

__all__ = [
    "EtcdAuthError",
    "EtcdConnectionError",
    "EtcdRendezvousError",
    "EtcdStateError",
    "StateTooLargeError",
    "StoreTimeoutError",
]


class EtcdRendezvousError(Exception):
    """Base class of every error raised by etcd_rdzv."""


class EtcdConnectionError(EtcdRendezvousError):
    """etcd could not be reached, or did not answer within the operation's deadline.

    Raised only after the operation's retries are spent. A write that ends with this error
    may or may not have been applied: read the state to find out.
    """


class EtcdAuthError(EtcdConnectionError):
    """etcd refused the credentials, or the user may not access the key prefix."""


class EtcdStateError(EtcdRendezvousError):
    """A stored value cannot be decoded, or a state cannot be stored."""


class StateTooLargeError(EtcdStateError):
    """A state does not fit etcd's request size limit, even compressed. Nothing was sent."""


class StoreTimeoutError(EtcdRendezvousError):
    """A store ``get`` or ``wait`` ended before every key it waited for was set."""
