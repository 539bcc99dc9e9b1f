"""An endpoint's life in the inference service, over the real broker, database and storage,
with a pool backend that starts nothing (the workers' side is covered end to end)."""

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from services.inference.autoscaler import Autoscaler
from services.inference.endpoints import Endpoints
from services.inference.leader import Lease
from services.inference.store import InferenceStore
from shared.contracts.identity import Principal
from shared.contracts.inference import SERVICE, CreateEndpoint, EndpointStatus, ListEndpoints
from shared.contracts.workers import WorkerHeartbeat, WorkerState
from shared.db import mongo_client
from shared.instance_types import InstanceType, ResourceLimitExceeded, UnknownInstanceType
from shared.messaging import EventPublisher, Names, QueueDepths, create_broker
from shared.outbox import Outbox

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN = Principal(username="admin", roles=["IT Operator"], permissions=["sagemaker_endpoint:all"])


class IdlePool:
    """Records what it is asked and starts nothing."""

    scales_itself = False

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.specs = {}

    async def create(self, spec) -> None:
        self.specs[spec.name] = spec

    async def scale(self, endpoint: str, count: int) -> None:
        self.sizes[endpoint] = count

    async def count(self, endpoint: str) -> int:
        return self.sizes.get(endpoint, 0)

    async def stop(self, endpoint: str) -> None:
        self.sizes.pop(endpoint, None)

    async def close(self) -> None:
        self.sizes.clear()


@pytest.fixture
async def inference(settings_factory):
    settings = settings_factory()
    names = Names(settings.broker_prefix)
    async with AsyncExitStack() as stack:
        broker = create_broker(settings)
        await broker.connect()
        stack.push_async_callback(broker.stop)
        await broker.declare_exchange(names.events)
        client = mongo_client(settings)
        stack.push_async_callback(client.close)
        store = InferenceStore(client[settings.database_name(SERVICE)], Outbox(EventPublisher(broker, names)))
        await store.ensure_indexes()
        depths = QueueDepths(settings.amqp_url)
        stack.push_async_callback(depths.close)
        pool = IdlePool()

        async def fail_job(inference_id: str, reason: str) -> None:
            raise AssertionError("no job is queued in these tests")

        # the operator's table: a CPU type without limit, and ESD's name for a GPU type, 4 at most
        table = {"cpu": InstanceType(), "ml.g5.2xlarge": InstanceType(quota=4, gpus=1, node_labels={"gpu": "a10g"})}
        endpoints = Endpoints(store, pool, broker, names, live_within=6, fail_job=fail_job, instance_types=table)
        autoscaler = Autoscaler(store, pool, depths, names, live_within=6, start_timeout=0.5, scale_down_after=60)
        yield endpoints, autoscaler, pool


def body(**overrides):
    values = {
        "endpoint_name": "life",
        "endpoint_type": "Async",
        "instance_type": "cpu",
        "initial_instance_count": 2,
        "autoscaling_enabled": False,
        "assign_to_roles": ["IT Operator"],
        "actor": ADMIN,
    }
    values.update(overrides)
    return CreateEndpoint(**values)


async def test_an_endpoint_whose_workers_never_come_up_fails_with_the_reason(inference):
    endpoints, autoscaler, pool = inference
    view = await endpoints.create(body())
    assert (view.endpoint_name, view.endpoint_status) == ("esd-async-life", EndpointStatus.CREATING)
    assert pool.sizes["esd-async-life"] == 2
    await asyncio.sleep(0.6)
    await autoscaler.once()
    endpoint = await endpoints.store.endpoint("esd-async-life")
    assert endpoint.status is EndpointStatus.FAILED
    assert "no worker reported ready within 0.5 s" in endpoint.error

    # a worker that comes up after all brings the endpoint into service
    await endpoints.heartbeat(
        WorkerHeartbeat(pool="esd-async-life", worker_id="late", state=WorkerState.READY, at=time.time())
    )
    endpoint = await endpoints.store.endpoint("esd-async-life")
    assert (endpoint.status, endpoint.error) == (EndpointStatus.IN_SERVICE, None)
    (listed,) = (await endpoints.list(ListEndpoints(actor=ADMIN))).endpoints
    assert listed.current_instance_count == "1"


async def test_a_fixed_pool_is_kept_at_its_size(inference):
    endpoints, autoscaler, pool = inference
    await endpoints.create(body(endpoint_name="fixed"))
    pool.sizes["esd-async-fixed"] = 1  # a worker died
    await autoscaler.once()
    assert pool.sizes["esd-async-fixed"] == 2


async def test_instance_types_place_pools_and_their_quota_is_esds_resource_limit(inference):
    endpoints, _, pool = inference
    gpu = {"instance_type": "ml.g5.2xlarge", "autoscaling_enabled": True}
    await endpoints.create(body(endpoint_name="gpu-a", min_instance_number=0, max_instance_number=3, **gpu))
    spec = pool.specs["esd-async-gpu-a"]
    assert (spec.placement.gpus, spec.placement.node_labels, spec.maximum) == (1, {"gpu": "a10g"}, 3)
    assert spec.queue == endpoints.names.work_queue("inference.esd-async-gpu-a").name

    # 3 held (the first endpoint's maximum), 2 more asked for, 4 allowed
    with pytest.raises(ResourceLimitExceeded) as refused:
        await endpoints.create(body(endpoint_name="gpu-b", max_instance_number=2, **gpu))
    assert refused.value.message == (
        "ResourceLimitExceeded: The account-level service limit 'ml.g5.2xlarge for endpoint usage' is 4 "
        "Instances, with current utilization of 3 Instances and a request delta of 2 Instances."
    )
    assert refused.value.status == 400
    assert await endpoints.store.endpoint("esd-async-gpu-b") is None
    await endpoints.create(body(endpoint_name="gpu-c", max_instance_number=1, **gpu))  # exactly the quota

    with pytest.raises(UnknownInstanceType) as unknown:
        await endpoints.create(body(endpoint_name="tpu", instance_type="ml.p4d.24xlarge"))
    assert unknown.value.message == "instance_type ml.p4d.24xlarge is not known here; known: cpu, ml.g5.2xlarge"


async def test_one_replica_leads_and_another_takes_over_when_its_lease_lapses(inference):
    endpoints, _, _ = inference
    leases = endpoints.store.endpoints.database["leases"]
    first, second = (Lease(leases, "autoscaler", holder, seconds=0.5) for holder in ("first", "second"))
    assert await first.hold()
    assert not await second.hold()
    assert await first.hold()  # renewed
    await asyncio.sleep(0.6)  # the first replica stops renewing (it died)
    assert await second.hold()
    assert not await first.hold()
    await second.release()  # a clean stop hands over at once
    assert await first.hold()
