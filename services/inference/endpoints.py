"""Endpoints: named pools of workers. Creating one checks its instance type and quota, declares
its queue, makes its pool and starts its workers; the workers' heartbeats make it InService;
deleting one removes its pool (running jobs finish first) and fails the jobs still queued."""

from __future__ import annotations

import time
import uuid

import structlog
from faststream.rabbit import RabbitBroker

from services.inference import domain
from services.inference.domain import Endpoint, Worker
from services.inference.store import InferenceStore
from shared.contracts.inference import (
    CreateEndpoint,
    DeleteEndpoints,
    EndpointDeleted,
    EndpointInService,
    EndpointPage,
    EndpointStatus,
    EndpointView,
    ListEndpoints,
    RunInference,
    queue_of,
)
from shared.contracts.workers import WorkerHeartbeat, WorkerState
from shared.instance_types import InstanceTable, check_quota, instance_type
from shared.messaging import Names, declare_work_queue
from shared.pools import PoolBackend, PoolSpec

log = structlog.get_logger(__name__)


class Endpoints:
    def __init__(
        self,
        store: InferenceStore,
        pools: PoolBackend,
        broker: RabbitBroker,
        names: Names,
        *,
        live_within: float,
        fail_job,
        instance_types: InstanceTable | None = None,
    ) -> None:
        self.store = store
        self.pools = pools
        self.broker = broker
        self.names = names
        self.live_within = live_within
        self.fail_job = fail_job  # (inference_id, reason): how a queued job of a deleted pool ends
        self.instance_types = instance_types or {}

    async def create(self, command: CreateEndpoint) -> EndpointView:
        minimum, maximum = command.limits()
        endpoint = Endpoint(
            id=str(uuid.uuid4()),
            name=domain.endpoint_name(command.endpoint_type, command.endpoint_name),
            type=command.endpoint_type,
            status=EndpointStatus.CREATING,
            instance_type=command.instance_type,
            autoscaling=command.autoscaling_enabled,
            initial=command.initial_instance_count,
            min=minimum,
            max=maximum,
            roles=list(dict.fromkeys(command.assign_to_roles)),
            owner=command.actor.username,
            created=time.time(),
        )
        # the type must be known, and its quota must have room (a concurrent creation can still
        # slip past it: the quota is a guard for operators, not an invariant)
        check_quota(
            self.instance_types,
            endpoint.instance_type,
            used=domain.instances_in_use(await self.store.all_endpoints(), endpoint.instance_type),
            delta=domain.instances_held(endpoint),
        )
        await self.store.add_endpoint(endpoint)
        await declare_work_queue(self.broker, self.names, queue_of(endpoint.name))
        count = domain.initial_workers(endpoint)
        await self.pools.create(self._pool_spec(endpoint))
        await self.pools.scale(endpoint.name, count)
        log.info("endpoint.created", endpoint=endpoint.name, workers=count, actor=command.actor.username)
        return domain.endpoint_view(endpoint, 0)

    def _pool_spec(self, endpoint: Endpoint) -> PoolSpec:
        return PoolSpec(
            name=endpoint.name,
            queue=self.names.work_queue(queue_of(endpoint.name)).name,
            instance_type=endpoint.instance_type,
            placement=instance_type(self.instance_types, endpoint.instance_type),
            minimum=endpoint.min,
            maximum=endpoint.max,
            initial=domain.initial_workers(endpoint),
            autoscaling=endpoint.autoscaling,
        )

    async def list(self, command: ListEndpoints) -> EndpointPage:
        views = []
        for endpoint in await self.store.all_endpoints():
            if domain.endpoint_listed(endpoint, command.actor, command.subject):
                live = await self.store.live_workers(endpoint.name, self.live_within)
                views.append(domain.endpoint_view(endpoint, len(live)))
        return EndpointPage(endpoints=views)

    async def delete(self, command: DeleteEndpoints) -> None:
        for name in dict.fromkeys(command.endpoint_name_list):
            if await self.store.endpoint(name) is None:
                continue
            await self.store.update_endpoint(name, status=EndpointStatus.DELETING)
            await self.pools.stop(name)  # running jobs finish first
            await self._fail_queued(name)
            await self.store.remove_endpoint(
                name,
                EndpointDeleted(endpoint_name=name, endpoint_status=EndpointStatus.DELETING, current_instance_count=0),
            )
            log.info("endpoint.deleted", endpoint=name, actor=command.actor.username)

    async def _fail_queued(self, name: str) -> None:
        queue = await self.broker.declare_queue(self.names.work_queue(queue_of(name)))
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            run = RunInference.model_validate_json(message.body)
            await self.fail_job(run.inference_id, f"endpoint {name} was deleted before the job ran")
        # The empty queue stays: declarations are cached per process, so a queue deleted here
        # would not be declared again for a new endpoint of the same name.

    async def heartbeat(self, beat: WorkerHeartbeat) -> None:
        if beat.state is WorkerState.STOPPING:
            await self.store.forget_worker(beat.worker_id)
            return
        await self.store.heartbeat(
            Worker(worker_id=beat.worker_id, endpoint_name=beat.pool, state=beat.state, last_seen=beat.at)
        )
        endpoint = await self.store.endpoint(beat.pool)
        if (
            endpoint is not None
            and endpoint.status in (EndpointStatus.CREATING, EndpointStatus.FAILED)
            and beat.state in (WorkerState.READY, WorkerState.BUSY)
        ):
            in_service = EndpointInService(
                endpoint_name=endpoint.name, endpoint_status=EndpointStatus.IN_SERVICE, current_instance_count=1
            )
            await self.store.update_endpoint(
                endpoint.name, [in_service], status=EndpointStatus.IN_SERVICE, ready_at=time.time(), error=None
            )
            log.info("endpoint.in_service", endpoint=endpoint.name, worker_id=beat.worker_id)
