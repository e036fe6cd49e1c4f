"""The native rendezvous (``handler=native``): etcd's own primitives, not torch's one blob.

torch's ``DynamicRendezvousHandler`` keeps a whole rendezvous in one pickled value that every
node rewrites by compare-and-swap on every join and every heartbeat. Here each concept has
the etcd primitive made for it (keys in :class:`~etcd_rdzv.keys.RunKeys`):

* **A node is a lease** (:mod:`.session`). Each node holds one lease for its life in the
  run, renewed every ``keep_alive_interval``: a heartbeat that writes no revision, so a
  training job writes nothing to etcd between membership changes. A node that dies loses
  its keys when its lease expires; one that leaves revokes it, and its keys go at once.
* **Joining is one Put** of the node's own key ``round/<r>/<node>`` under its lease (with
  the delete of its previous key, in the same Txn): no compare, no conflict.
* **One Txn seals a round**: a create-only write of ``ctl/seal/<r>`` holding the *cutoff*
  revision and the size. The roster is every join key of round ``r`` that existed at the
  cutoff; a node's rank is the number of roster keys that sort before its own (one
  ``count_only`` Range at the cutoff revision), which is the rank torch gives it, since
  keys sort as torch sorts node descriptors. Any node may seal: the one whose join made
  ``max_nodes``, or, once ``min_nodes`` have joined and the previous round is empty, the
  first whose ``last_call_timeout`` runs out. Exactly one create succeeds.
* **One watch per process and run**, on the few ``ctl/`` keys (:mod:`.control`): a node
  learns that its round is sealed from the event, never by polling.
* **Waiting and standing by.** A node that finds the open round sealed without it joins the
  next one. If the sealed round has room (fewer than ``max_nodes``, or a member gone), it
  also puts ``ctl/wait/<r+1>`` under its lease: the members' ``num_nodes_waiting()`` turns
  positive, their agents restart them, and they all join round ``r + 1``. Otherwise it
  stands by (torch's redundancy list) until a member leaves or the run closes.
* **The run's shared keys** (seals, ``closed``, the store) are put under a run lease that
  every node renews too, free of revisions: they live while any node lives and expire
  ``ttl`` seconds after the last one left. A seal removes the keys of the round before last.

**etcd outages.** Keep-alives are retried every interval while etcd is away; etcd extends
every lease by its TTL when a leader is elected, so a node's lease survives the outage.
``num_nodes_waiting()`` answers from the watched ``ctl/`` keys, so it needs etcd only while
somebody waits, and answers its last value (with a warning) when etcd is away. Nothing is
purged when etcd comes back.

The modules, one concept each: :mod:`.model` (nodes, settings, seals, admissions),
:mod:`.control` (the ``ctl/`` keys, parsed and followed), :mod:`.session` (leases and their
policy), :mod:`.view` (what a node knows), :mod:`.decide` (the protocol's rules, pure),
:mod:`.rounds` (each step's etcd requests), :mod:`.node` (the executor:
:class:`AsyncNativeRendezvous`), :mod:`.run` (closing a run, one protocol per run).
"""

from .control import ControlChange, ControlFeed, ControlSnapshot, ControlView
from .model import Admission, NativeSettings, NodeId, Seal
from .node import AsyncNativeRendezvous
from .run import close_native_run, refuse_native_run, torch_run_error
from .session import (
    RUN_LEASE_RENEWALS_PER_TTL,
    NodeSession,
    RunLease,
    run_lease,
    run_lease_idle_seconds,
    run_lease_renewal_period,
)

__all__ = [
    "RUN_LEASE_RENEWALS_PER_TTL",
    "Admission",
    "AsyncNativeRendezvous",
    "ControlChange",
    "ControlFeed",
    "ControlSnapshot",
    "ControlView",
    "NativeSettings",
    "NodeId",
    "NodeSession",
    "RunLease",
    "Seal",
    "close_native_run",
    "refuse_native_run",
    "run_lease",
    "run_lease_idle_seconds",
    "run_lease_renewal_period",
    "torch_run_error",
]
