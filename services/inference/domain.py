"""The inference service's decisions: endpoint names, who may use which endpoint, which
models a job names, and how jobs and endpoints look to ESD clients. Pure functions."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from shared.contracts.inference import TASK_TYPES, EndpointStatus, EndpointType, EndpointView
from shared.errors import Invalid
from shared.esd import esd_time

PASS_THROUGH_VAES = ("Automatic", "None")
RUNNABLE_TASKS = ("txt2img", "img2img")


def endpoint_name(endpoint_type: EndpointType, name: str | None) -> str:
    """ESD's naming: `esd-<type lowercased>-<name or 7 hex>` (`esd-real-time-test`)."""
    return f"esd-{endpoint_type.value.lower()}-{name or uuid.uuid4().hex[:7]}"


def shares_a_role(owner_roles: Iterable[str], roles: Iterable[str]) -> bool:
    return bool(set(owner_roles) & set(roles))


def endpoint_view(endpoint: dict[str, Any], current: int) -> EndpointView:
    return EndpointView(
        EndpointDeploymentJobId=endpoint["id"],
        endpoint_name=endpoint["name"],
        endpoint_type=endpoint["type"],
        endpoint_status=endpoint["status"],
        instance_type=endpoint["instance_type"],
        autoscaling=endpoint["autoscaling"],
        min_instance_number=str(endpoint["min"]),
        max_instance_number=str(endpoint["max"]),
        current_instance_count=str(current),
        startTime=esd_time(endpoint["created"]) or "",
        endTime=esd_time(endpoint.get("ready_at")),
        error=endpoint.get("error"),
        owner_group_or_role=endpoint["roles"],
    )


EXTRA_TASKS = ("extra-single-image", "extra-batch-images", "rembg")


def check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        # ESD's exact phrasing, which clients match on
        raise Invalid(f"task type {task_type} should be in {list(EXTRA_TASKS)} or {list(RUNNABLE_TASKS)}")


def choose_endpoint(
    endpoints: list[dict[str, Any]],
    *,
    inference_type: EndpointType,
    named: str | None,
    username: str,
    roles: list[str],
) -> dict[str, Any]:
    """The named endpoint (it must be in service), or an in-service endpoint of the type
    whose roles the user shares (the least loaded is the caller's business: pools scale)."""
    if named:
        for endpoint in endpoints:
            if endpoint["name"] == named:
                if endpoint["status"] != EndpointStatus.IN_SERVICE:
                    raise Invalid(f"endpoint {named} is {endpoint['status']}, not InService")
                if endpoint["type"] != inference_type:
                    raise Invalid(f"endpoint {named} is {endpoint['type']}, not {inference_type.value}")
                return endpoint
        raise Invalid(f"endpoint {named} not found")
    for endpoint in endpoints:
        if (
            endpoint["type"] == inference_type
            and endpoint["status"] == EndpointStatus.IN_SERVICE
            and shares_a_role(endpoint["roles"], roles)
        ):
            return endpoint
    raise Invalid(f'no available {inference_type.value} endpoints for user "{username}"')


def requested_models(models: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(type, name) of every checkpoint a job names; VAE `Automatic` and `None` need none."""
    wanted = []
    for checkpoint_type, names in models.items():
        for name in names:
            if checkpoint_type == "VAE" and name in PASS_THROUGH_VAES:
                continue
            wanted.append((checkpoint_type, name))
    return wanted


def check_runnable(task_type: str, models: dict[str, list[str]]) -> None:
    if task_type in RUNNABLE_TASKS and not [n for n in models.get("Stable-diffusion", []) if n]:
        raise Invalid('models must name a Stable-diffusion checkpoint, e.g. {"Stable-diffusion": ["v1-5.safetensors"]}')


def payload_key(task_type: str, inference_id: str) -> str:
    return f"{task_type}/infer_v2/{inference_id}/api_param.json"


def output_prefix(inference_id: str) -> str:
    return f"out/{inference_id}/result"
