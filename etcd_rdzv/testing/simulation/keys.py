"""The run's keys, the same bytes as :class:`~etcd_rdzv.keys.RunKeys` builds, computed once.

``RunKeys`` builds each prefix afresh on every use, which is nothing next to an etcd call
but most of a simulated step: the simulation builds tens of thousands of views and parses
every ``ctl/`` change once per node.
"""

from __future__ import annotations

from functools import cached_property

from etcd_rdzv.keys import RunKeys

__all__ = ["SimKeys"]


class SimKeys(RunKeys):
    """:class:`RunKeys` whose prefixes are computed once (same values)."""

    @cached_property
    def state(self) -> bytes:
        return RunKeys.state.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def native_prefix(self) -> bytes:
        return RunKeys.native_prefix.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def control_prefix(self) -> bytes:
        return RunKeys.control_prefix.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def run_lease(self) -> bytes:
        return RunKeys.run_lease.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def closed(self) -> bytes:
        return RunKeys.closed.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def seal_prefix(self) -> bytes:
        return RunKeys.seal_prefix.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def waiting_prefix(self) -> bytes:
        return RunKeys.waiting_prefix.fget(self)  # type: ignore[attr-defined,no-any-return]

    @cached_property
    def rounds_prefix(self) -> bytes:
        return RunKeys.rounds_prefix.fget(self)  # type: ignore[attr-defined,no-any-return]
