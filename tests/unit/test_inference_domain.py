"""The inference service's decisions: where a job may run and which endpoint takes it."""

import pytest

from services.inference import domain
from services.inference.domain import Endpoint
from shared.contracts.inference import EndpointStatus, EndpointType
from shared.errors import Invalid


def endpoint(name: str, *, status=EndpointStatus.IN_SERVICE, kind=EndpointType.ASYNC, roles=("team",)) -> Endpoint:
    return Endpoint(
        id=name,
        name=name,
        type=kind,
        status=status,
        instance_type="local",
        autoscaling=False,
        initial=1,
        min=0,
        max=1,
        roles=list(roles),
        owner="admin",
        created=0.0,
    )


ENDPOINTS = [
    endpoint("esd-async-a"),
    endpoint("esd-async-b"),
    endpoint("esd-async-other", roles=("others",)),
    endpoint("esd-async-starting", status=EndpointStatus.CREATING),
    endpoint("esd-real-time-r", kind=EndpointType.REAL_TIME),
]


def candidates(**overrides):
    values = {"inference_type": EndpointType.ASYNC, "named": None, "username": "dana", "roles": ["team"]}
    values.update(overrides)
    return [e.name for e in domain.candidate_endpoints(ENDPOINTS, **values)]


def test_a_job_may_run_on_every_in_service_endpoint_of_its_type_that_the_user_shares():
    assert candidates() == ["esd-async-a", "esd-async-b"]
    assert candidates(inference_type=EndpointType.REAL_TIME) == ["esd-real-time-r"]


def test_a_named_endpoint_must_be_in_service_and_of_the_type():
    assert candidates(named="esd-async-b") == ["esd-async-b"]
    with pytest.raises(Invalid, match="is Creating, not InService"):
        candidates(named="esd-async-starting")
    with pytest.raises(Invalid, match="is Real-time, not Async"):
        candidates(named="esd-real-time-r")
    with pytest.raises(Invalid, match="endpoint esd-async-z not found"):
        candidates(named="esd-async-z")


def test_no_endpoint_is_esds_message():
    with pytest.raises(Invalid, match='no available Async endpoints for user "dana"'):
        candidates(roles=["nobody"])


def test_the_least_busy_endpoint_takes_the_job():
    a, b = ENDPOINTS[:2]
    assert (
        domain.least_busy([a, b], {"esd-async-a": domain.load_of(3, 1, 2), "esd-async-b": domain.load_of(0, 1, 1)}) is b
    )
    assert domain.least_busy([a, b], {"esd-async-a": 0.0, "esd-async-b": 0.0}) is a  # the first of equals
    assert domain.load_of(queued=4, busy=2, live=0) == 6  # no worker yet: all of it on one
    assert domain.load_of(queued=4, busy=2, live=3) == 2


def test_extras_and_rembg_jobs_need_no_stable_diffusion_checkpoint():
    for task in ("extra-single-image", "extra-batch-images", "rembg"):
        domain.check_runnable(task, {})
        domain.check_runnable(task, {"ESRGAN": ["4x-tiny.pth"]})


def test_extras_models_are_requested_by_their_type():
    assert domain.requested_models({"ESRGAN": ["4x.pth"], "rembg": ["u2net.onnx"], "VAE": ["Automatic"]}) == [
        ("ESRGAN", "4x.pth"),
        ("rembg", "u2net.onnx"),
    ]
