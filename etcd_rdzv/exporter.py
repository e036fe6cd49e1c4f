"""A Prometheus exporter: the rendezvous runs under one key prefix, and etcd itself.

``etcd-rdzv exporter --listen :9400`` serves ``/metrics`` (through ``prometheus_client``,
``pip install etcd-rdzv[exporter]``). Policy:

* **One read per scrape for every run**: a range read of the key prefix
  (:meth:`RendezvousAdmin.list_runs` without its per-run lease look-ups), plus etcd's status
  and alarms. A scrape is bounded by ``scrape_timeout``; runs are not cached between
  scrapes, so what Prometheus stores is what etcd held at the scrape.
* **An outage is a value, not an error**: when etcd does not answer, the scrape still
  succeeds with ``etcd_rdzv_up 0`` (and no run metrics), so alerts can fire on it. A
  permanent failure (credentials or permission refused, TLS misconfigured: not a
  :class:`~etcd_rdzv.errors.TransientError`) gives ``etcd_rdzv_up 0`` too, but is logged
  as an error in its own words, since no scrape will succeed until someone fixes it.
* Both handlers: ``handler=torch`` runs report what torch's state holds (decoded with the
  restricted unpickler of :mod:`etcd_rdzv.state`), ``handler=native`` runs what their keys
  show. Node roles are torch's words: ``participant``, ``waiting``, ``standby``.

The metric table and example alert rules are in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .deadline import Deadline
from .errors import EtcdRendezvousError, TransientError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .admin import RendezvousAdmin, RunInfo

__all__ = ["DEFAULT_QUOTA_BYTES", "RendezvousCollector"]

log = logging.getLogger(__name__)

#: etcd's default ``--quota-backend-bytes`` (2 GiB); etcd does not report the one it uses.
DEFAULT_QUOTA_BYTES = 2 * 1024**3
_ROLES = ("participant", "waiting", "standby")


@dataclass(frozen=True)
class _Scrape:
    """What one scrape read from etcd."""

    runs: list[RunInfo]
    db_size: int
    db_size_in_use: int
    alarms: list[str]
    seconds: float


class RendezvousCollector:
    """A ``prometheus_client`` collector over a :class:`RendezvousAdmin`.

    ``collect()`` runs in the HTTP server's thread; the scrape itself runs on ``loop``, the
    event loop the admin's client belongs to.

    Args:
        admin: reads the runs under its key prefix.
        loop: the running event loop that serves ``admin``.
        scrape_timeout: the deadline of one scrape, seconds.
        quota_bytes: etcd's ``--quota-backend-bytes``, for the quota gauge.
    """

    def __init__(self, admin: RendezvousAdmin, loop: asyncio.AbstractEventLoop, *,
                 scrape_timeout: float = 10.0, quota_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        self._admin = admin
        self._loop = loop
        self._timeout = scrape_timeout
        self._quota = quota_bytes

    async def scrape(self) -> _Scrape:
        """Read every run and etcd's status, within ``scrape_timeout``."""
        started = time.monotonic()
        client = self._admin.client
        runs, status, alarms = await asyncio.gather(
            self._admin.list_runs(lease_ages=False),
            client.status(Deadline.after(self._timeout)),
            client.alarms(Deadline.after(self._timeout)),
        )
        return _Scrape(runs, status.db_size, status.db_size_in_use, alarms,
                       time.monotonic() - started)

    def collect(self) -> Iterator[Metric]:
        """The metrics of one scrape (``prometheus_client``'s collector protocol)."""
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("etcd_rdzv_up", "1 when this scrape read etcd, 0 when it "
                               "could not (no answer within the scrape timeout, or a refusal)")
        future = asyncio.run_coroutine_threadsafe(self.scrape(), self._loop)
        try:
            scrape = future.result(self._timeout + 1)
        except (TransientError, TimeoutError) as exc:
            future.cancel()
            log.warning("scrape failed: etcd did not answer (%s)", exc)
            up.add_metric([], 0)
            yield up
            return
        except EtcdRendezvousError as exc:
            log.error("scrape failed, and will fail until this is fixed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _etcd_metrics(scrape, self._quota)
        yield from _run_metrics(scrape.runs)


def _etcd_metrics(scrape: _Scrape, quota: int) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, text: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, text)
        family.add_metric([], value)
        return family

    yield gauge("etcd_rdzv_scrape_duration_seconds", "How long reading etcd took",
                scrape.seconds)
    yield gauge("etcd_rdzv_etcd_db_size_bytes", "etcd's database size on disk (what its "
                "quota counts), as the member asked reports it", scrape.db_size)
    yield gauge("etcd_rdzv_etcd_db_size_in_use_bytes", "The part of etcd's database in use; "
                "a defragmentation reclaims the rest", scrape.db_size_in_use)
    yield gauge("etcd_rdzv_etcd_quota_bytes", "etcd's --quota-backend-bytes, as given to "
                "the exporter (--quota-bytes)", quota)
    yield gauge("etcd_rdzv_etcd_nospace_alarm", "1 while etcd's NOSPACE alarm is raised: "
                "etcd refuses writes until compacted, defragmented and disarmed",
                1 if "NOSPACE" in scrape.alarms else 0)
    yield gauge("etcd_rdzv_runs", "Runs under the key prefix", len(scrape.runs))


def _run_metrics(runs: list[RunInfo]) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    labels = ["run_id", "handler"]
    nodes = GaugeMetricFamily("etcd_rdzv_run_nodes", "A run's nodes by role (torch's words: "
                              "participant, waiting for the next round, standby beyond "
                              "max_nodes)", labels=[*labels, "role"])
    round_ = GaugeMetricFamily("etcd_rdzv_run_round", "The run's current round (native: the "
                               "latest sealed one)", labels=labels)
    world = GaugeMetricFamily("etcd_rdzv_run_world_size", "Nodes in the current round",
                              labels=labels)
    complete = GaugeMetricFamily("etcd_rdzv_run_complete", "1 when the current round is "
                                 "complete: every participant has its rank", labels=labels)
    closed = GaugeMetricFamily("etcd_rdzv_run_closed", "1 when the run is closed",
                               labels=labels)
    heartbeat = GaugeMetricFamily(
        "etcd_rdzv_run_oldest_heartbeat_age_seconds", "handler=torch: seconds since the "
        "oldest node heartbeat in the state, by this host's clock (native heartbeats are "
        "lease keep-alives: a node that stops has no key left)", labels=labels)
    stored = GaugeMetricFamily("etcd_rdzv_run_state_bytes", "handler=torch: the stored "
                               "state's size", labels=labels)
    unreadable = GaugeMetricFamily("etcd_rdzv_run_unreadable", "1 when the run's state "
                                   "cannot be decoded (see etcd-rdzv status)", labels=labels)
    now = datetime.datetime.now(datetime.timezone.utc)
    for run in runs:
        handler = run.handler or "none"
        key = [run.run_id, handler]
        unreadable.add_metric(key, 1 if run.error else 0)
        if run.native is not None:
            view = run.native
            counts = {"participant": view.counts.get("member", 0),
                      "waiting": view.counts.get("waiting", 0),
                      "standby": view.counts.get("standby", 0)}
            state = view.state
            round_value, world_size = view.round or 0, view.world_size
            is_complete, is_closed = state == "complete", view.closed
        elif run.state is not None:
            torch_state = run.state
            counts = {"participant": len(torch_state.participants),
                      "waiting": len(torch_state.wait_list),
                      "standby": len(torch_state.redundancy_list)}
            round_value, world_size = torch_state.round, torch_state.world_size
            is_complete, is_closed = torch_state.complete, torch_state.closed
            stored.add_metric(key, run.state_bytes)
            if torch_state.last_heartbeats:
                oldest = min(torch_state.last_heartbeats.values())
                heartbeat.add_metric(key, max(0.0, (now - oldest).total_seconds()))
        else:
            continue
        for role in _ROLES:
            nodes.add_metric([*key, role], counts[role])
        round_.add_metric(key, round_value)
        world.add_metric(key, world_size)
        complete.add_metric(key, 1 if is_complete else 0)
        closed.add_metric(key, 1 if is_closed else 0)
    yield from (nodes, round_, world, complete, closed, heartbeat, stored, unreadable)
