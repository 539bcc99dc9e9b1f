"""Instance types: the operator's table, ESD's names in it, quotas with ESD's message, and what a
type means for a swarm worker's service."""

import json

import pytest

from services.inference.domain import Endpoint, instances_in_use
from shared.contracts.inference import EndpointStatus, EndpointType
from shared.errors import Invalid
from shared.instance_types import (
    InstanceType,
    ResourceLimitExceeded,
    UnknownInstanceType,
    check_quota,
    instance_type,
    load_table,
)
from shared.pools import PoolSpec, worker_environment
from shared.pools.swarm import SwarmPool, memory_bytes

TABLE = json.dumps(
    {
        "ml.g5.2xlarge": {"gpus": 1, "quota": 2, "node_labels": {"gpu": "a10g"}, "memory": "24Gi"},
        "cpu": {"cpus": 2},
    }
)


def test_without_a_table_every_name_runs_as_local():
    assert load_table() == {}
    assert instance_type({}, "ml.g5.2xlarge") == InstanceType()
    check_quota({}, "local", used=1000, delta=1000)  # no quota


def test_a_table_from_json_or_a_file(tmp_path):
    table = load_table(TABLE)
    assert table["ml.g5.2xlarge"] == InstanceType(gpus=1, quota=2, node_labels={"gpu": "a10g"}, memory="24Gi")
    path = tmp_path / "types.json"
    path.write_text(TABLE)
    assert load_table("", path) == table
    with pytest.raises(ValueError):
        load_table('{"x": {"gpu": 1}}')  # a misspelt field is refused, not ignored


def test_an_unknown_type_is_a_400_naming_the_known_ones():
    with pytest.raises(UnknownInstanceType) as refused:
        instance_type(load_table(TABLE), "ml.p5.48xlarge")
    assert isinstance(refused.value, Invalid)
    assert refused.value.message == "instance_type ml.p5.48xlarge is not known here; known: cpu, ml.g5.2xlarge"


def test_beyond_the_quota_is_esds_resource_limit_exceeded():
    table = load_table(TABLE)
    check_quota(table, "ml.g5.2xlarge", used=1, delta=1)
    with pytest.raises(ResourceLimitExceeded) as refused:
        check_quota(table, "ml.g5.2xlarge", used=1, delta=2)
    assert refused.value.message == (
        "ResourceLimitExceeded: The account-level service limit 'ml.g5.2xlarge for endpoint usage' is 2 Instances, "
        "with current utilization of 1 Instances and a request delta of 2 Instances."
    )


def endpoint(name: str, instance: str, *, autoscaling: bool, initial: int, maximum: int) -> Endpoint:
    return Endpoint(
        id=name,
        name=name,
        type=EndpointType.ASYNC,
        status=EndpointStatus.IN_SERVICE,
        instance_type=instance,
        autoscaling=autoscaling,
        initial=initial,
        min=0,
        max=maximum,
        roles=["r"],
        owner="o",
        created=0,
    )


def test_an_endpoint_holds_what_it_may_grow_to():
    endpoints = [
        endpoint("a", "gpu", autoscaling=True, initial=1, maximum=4),  # may grow to 4
        endpoint("b", "gpu", autoscaling=False, initial=2, maximum=9),  # fixed at 2
        endpoint("c", "cpu", autoscaling=True, initial=1, maximum=5),
    ]
    assert instances_in_use(endpoints, "gpu") == 6
    assert instances_in_use(endpoints, "tpu") == 0


def test_a_swarm_pool_is_a_labelled_service_placed_by_its_instance_type():
    pool = SwarmPool(image="esd-platform:1", prefix="esd-", network="esd-net", env={"ESD_A": "1"}, drain_seconds=300)
    spec = PoolSpec(
        name="esd-async-x",
        queue="inference.esd-async-x",
        instance_type="ml.g5.2xlarge",
        placement=load_table(TABLE)["ml.g5.2xlarge"],
        minimum=0,
        maximum=3,
        initial=1,
        autoscaling=True,
    )
    made = pool.service_spec(spec)
    assert made["name"] == "esd-pool-esd-async-x"
    assert made["command"] == ["esd-inference-worker", "--endpoint", "esd-async-x"]
    assert made["labels"] == {
        "esd.role": "inference-worker",
        "esd.pool": "esd-async-x",
        "esd.instance-type": "ml.g5.2xlarge",
    }
    assert made["constraints"] == ["node.labels.gpu==a10g"]
    assert made["resources"]["Reservations"]["GenericResources"] == [
        {"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}
    ]
    assert made["resources"]["Reservations"]["MemoryBytes"] == 24 * 1024**3
    assert made["stop_grace_period"] > 300 * 10**9  # past the worker's drain
    assert made["mode"]["replicated"]["Replicas"] == 0 and made["networks"] == ["esd-net"]
    assert made["env"] == ["ESD_A=1", "ESD_WORKER_ID={{.Task.Name}}"]
    assert memory_bytes("512Mi") == 512 * 1024**2


def test_swarm_workers_get_the_services_settings_but_not_its_secrets_or_pool_settings():
    env = worker_environment(
        {
            "ESD_AMQP_URL": "amqp://x",
            "S3_ENDPOINT_URL": "http://s3",
            "ESD_API_KEY": "k",
            "ESD_POOL_BACKEND": "swarm",
            "PATH": "/bin",
        }
    )
    assert env == {"ESD_AMQP_URL": "amqp://x", "S3_ENDPOINT_URL": "http://s3"}
