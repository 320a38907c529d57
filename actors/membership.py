"""The node's membership child (``/root/membership``): the periodic sweep of dead nodes.

Every node sweeps (:func:`storage.membership.sweep`), every ``sweep_interval`` seconds (the
first one interval after start-up, whose recovery has just swept), and
at once again while a pass reports work left (a pass is bounded by ``limit`` rows); the
database's row locks make a dead node's work interrupted once whichever nodes sweep. The
heartbeat itself is the persistence actor's (it knows whether the database takes this node's
writes); this child only reads and marks other nodes' rows.

Database work runs in a worker thread (``trio.to_thread.run_sync``) over one connection of
its own, reconnected after a failure. A failing database is logged (``membership.sweep_failed``,
once per failure streak) and retried at the next interval: the sweep is housekeeping, and a
crash loop here would only charge the root supervisor's intensity for a database outage
that the persistence actor already reports. Cancellation waits for a pass in flight, which
its ``statement_timeout`` bounds.

It also answers ``exai status --cluster`` (:meth:`Membership.cluster`), on a short
connection of its own per request: an operator's request, rare, not worth a pooled one. With
the nodes it reads the cluster's limits as one (:func:`storage.shared_limits.read_shared_usage`):
the shared buckets this node's configuration names (each with this node's capacity for it) and
the durable quotas of its configured identities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psycopg
import structlog
import trio

from runtime.supervision import ChildContext
from storage.connection import Connector
from storage.membership import SWEEP_LIMIT, ClusterNode, SweepReport, cluster_nodes, sweep
from storage.shared_limits import (
    BucketSpec,
    ClusterLimitsView,
    Period,
    PeriodQuota,
    cluster_limits_view,
    read_shared_usage,
)

log = structlog.get_logger("membership")


class Membership:
    """The sweep loop and the cluster view of one node (see the module doc)."""

    def __init__(
        self,
        database_url: str,
        node_id: str,
        *,
        node_timeout: float,
        sweep_interval: float,
        limit: int = SWEEP_LIMIT,
        buckets: Sequence[BucketSpec] = (),
        quotas: Mapping[str, Mapping[Period, PeriodQuota]] | None = None,
    ) -> None:
        self._buckets = list({b.key: b for b in buckets}.values())  # one per shared key
        self._quotas = dict(quotas or {})
        self._url = database_url
        self._node_id = node_id
        self._node_timeout = node_timeout
        self._interval = sweep_interval
        self._limit = limit
        self._connector = Connector(database_url)
        #: Passes run and rows marked by this node, for logs and tests.
        self.passes = 0
        self.swept_tasks = 0
        self.swept_sessions = 0

    async def run(self, ctx: ChildContext) -> None:
        """The supervised child: sweep until asked to stop; the connection closed on exit."""
        ctx.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._loop)
                await ctx.stop_requested.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._connector.close()

    async def _loop(self) -> None:
        # Start-up recovery has just done a pass (storage.recovery): the first is one
        # interval away.
        await trio.sleep(self._interval)
        failing = False
        while True:
            try:
                report = await trio.to_thread.run_sync(self._sweep_once)
            except psycopg.Error as exc:
                self._connector.discard()
                if not failing:
                    log.warning("membership.sweep_failed", error=str(exc).strip()[:200])
                failing = True
                report = None
            else:
                if failing:
                    log.info("membership.sweep_recovered")
                failing = False
            if report is not None and report.more:
                await trio.lowlevel.checkpoint()
                continue  # work left on a dead node: the next pass at once
            await trio.sleep(self._interval)

    def _sweep_once(self) -> SweepReport:
        report = sweep(
            self._connector.connection(),
            self._node_id,
            node_timeout=self._node_timeout,
            limit=self._limit,
        )
        self.passes += 1
        if report.tasks or report.sessions or report.swept_nodes:
            self.swept_tasks += report.tasks
            self.swept_sessions += report.sessions
            log.warning("membership.swept", **report.model_dump())
        return report

    async def cluster(self) -> tuple[list[ClusterNode], ClusterLimitsView]:
        """Every node the database knows (recently heard of) and the cluster's limits as
        one, as ``status --cluster`` shows them. Raises ``psycopg.Error``."""
        return await trio.to_thread.run_sync(self._read_cluster)

    def _read_cluster(self) -> tuple[list[ClusterNode], ClusterLimitsView]:
        connector = Connector(self._url)
        try:
            conn = connector.connection()
            nodes = cluster_nodes(conn, node_timeout=self._node_timeout)
            shared, quotas = read_shared_usage(conn, self._buckets, self._quotas)
        finally:
            connector.close()
        return nodes, cluster_limits_view(nodes, shared, quotas)
