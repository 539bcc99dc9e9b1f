"""The autoscaler: once a second it sizes every pool by its backlog (the rule is
`scaling.desired_workers`, pure and unit-tested) and fails endpoints whose first worker never
came up. Every change it makes is logged. Only the replica of the service that holds the
leader lease (`leader.py`) runs it; where the pool backend scales itself (Kubernetes: KEDA), it
only watches for endpoints that never come up."""

from __future__ import annotations

import asyncio
import time

import structlog

from services.inference.leader import Lease
from services.inference.scaling import PoolLimits, PoolState, desired_workers
from services.inference.store import InferenceStore
from shared.contracts.inference import EndpointFailed, EndpointStatus, queue_of
from shared.contracts.workers import WorkerState
from shared.errors import outage
from shared.messaging import Names, QueueDepths
from shared.metrics import POOL_BUSY_WORKERS, POOL_WORKERS, QUEUE_DEPTH
from shared.pools import PoolBackend

log = structlog.get_logger(__name__)


class Autoscaler:
    def __init__(
        self,
        store: InferenceStore,
        pools: PoolBackend,
        depths: QueueDepths,
        names: Names,
        *,
        live_within: float,
        start_timeout: float,
        scale_down_after: float,
        lease: Lease | None = None,
    ) -> None:
        self.store = store
        self.pools = pools
        self.depths = depths
        self.names = names
        self.live_within = live_within
        self.start_timeout = start_timeout
        self.scale_down_after = scale_down_after
        self.lease = lease
        self.last_busy: dict[str, float] = {}
        self.gauged: set[str] = set()  # endpoints the pool gauges show

    async def once(self) -> None:
        now = time.time()
        seen: set[str] = set()
        for endpoint in await self.store.all_endpoints():
            name = endpoint.name
            if endpoint.status is EndpointStatus.DELETING:
                continue
            live = await self.store.live_workers(name, self.live_within)
            busy = sum(1 for worker in live if worker.state is WorkerState.BUSY)
            queued = await self.depths.depth(self.names.work_queue(queue_of(name)).name)
            seen.add(name)
            QUEUE_DEPTH.labels(endpoint=name).set(queued)
            POOL_WORKERS.labels(endpoint=name).set(len(live))
            POOL_BUSY_WORKERS.labels(endpoint=name).set(busy)
            if queued or busy:
                self.last_busy[name] = now
            # idle counts from when the pool went into service: never while it is starting
            since = max(self.last_busy.get(name, 0.0), endpoint.ready_at or now)
            # a pool that scales itself is not asked each second: its live workers tell enough
            current = len(live) if self.pools.scales_itself else await self.pools.count(name)
            state = PoolState(queued=queued, busy=busy, current=current, idle_seconds=now - since)
            limits = PoolLimits(
                minimum=endpoint.min,
                maximum=endpoint.max,
                autoscaling=endpoint.autoscaling,
                scale_down_after=self.scale_down_after,
            )
            wanted = desired_workers(state, limits, endpoint.initial)
            if wanted != state.current and not self.pools.scales_itself:
                log.info("pool.scaling", endpoint=name, queued=queued, busy=busy, current=state.current, wanted=wanted)
                await self.pools.scale(name, wanted)
            if endpoint.status is EndpointStatus.CREATING and not live and now - endpoint.created > self.start_timeout:
                error = f"no worker reported ready within {self.start_timeout:g} s; see the worker logs"
                failed = EndpointFailed(
                    endpoint_name=name, endpoint_status=EndpointStatus.FAILED, current_instance_count=0
                )
                await self.store.update_endpoint(name, [failed], status=EndpointStatus.FAILED, error=error)
                log.warning("endpoint.failed", endpoint=name, error=error)
        # deleted endpoints leave the gauges (a series per endpoint ever made would pile up)
        for name in self.gauged - seen:
            for gauge in (QUEUE_DEPTH, POOL_WORKERS, POOL_BUSY_WORKERS):
                gauge.remove(name)
        self.gauged = seen

    async def forever(self, interval: float = 1.0) -> None:
        """Size the pools every `interval` seconds while this replica leads; on the way out, give
        the lead back so that another replica takes over at once."""
        try:
            while True:
                try:
                    if self.lease is None or await self.lease.hold():
                        await self.once()
                    else:
                        self.last_busy.clear()  # the leader's to know; read afresh on taking over
                except Exception as error:
                    if (away := outage(error)) is not None:  # tried again next turn: no stack trace
                        log.warning("autoscaler.dependency_unavailable", error=away.message)
                    else:
                        log.exception("autoscaler.failed")
                await asyncio.sleep(interval)
        finally:
            if self.lease is not None:
                await asyncio.shield(self.lease.release())
