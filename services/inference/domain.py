"""The inference service's records (endpoints, workers, jobs, the catalog of usable
checkpoints) and its decisions: endpoint names, who may use which endpoint, which models a job
names, and how endpoints look to ESD clients. Pure: no I/O."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.identity import Principal
from shared.contracts.inference import (
    FINISHED,
    TASK_TYPES,
    EndpointStatus,
    EndpointType,
    EndpointView,
    JobProgress,
    JobStatus,
    ModelFile,
    ModelRef,
)
from shared.contracts.workers import WorkerState
from shared.errors import Invalid, NotFound
from shared.esd import esd_time
from shared.permissions import allows, shared_with


class Record(BaseModel):
    # stored documents carry MongoDB's `_id` and, after upgrades, fields a record no longer has
    model_config = ConfigDict(extra="ignore")


class Endpoint(Record):
    """A named pool of workers consuming `inference.<name>`."""

    id: str
    name: str
    type: EndpointType
    status: EndpointStatus
    instance_type: str
    autoscaling: bool
    initial: int
    min: int
    max: int
    roles: list[str]
    owner: str
    created: float
    ready_at: float | None = None
    error: str | None = None


class Worker(Record):
    """A worker as its last heartbeat described it."""

    worker_id: str
    endpoint_name: str
    state: WorkerState
    last_seen: float


class CatalogEntry(Record):
    """An Active checkpoint this service may hand to workers (a read model of the checkpoint
    service's events)."""

    checkpoint_id: str
    type: str
    names: list[str]
    prefix: str  # object key prefix of its files
    allowed_roles: list[str]


class InferenceJob(Record):
    id: str
    task_type: str
    inference_type: EndpointType
    status: JobStatus
    owner: str
    roles: list[str]
    endpoint_name: str
    endpoint_id: str
    instance_type: str
    models: list[ModelRef]
    files: list[ModelFile]
    payload_key: str
    created: float
    image_names: list[str] = Field(default_factory=list)
    attempts: int = 0
    start_time: float | None = None
    complete_time: float | None = None
    run_started: float | None = None
    worker_id: str | None = None
    error: str | None = None
    progress: JobProgress | None = None
    info: dict[str, Any] = Field(default_factory=dict)
    preview_every: int | None = None
    # False between the start being recorded and its message being on the endpoint's queue: a
    # start that died in between (killed, the broker away) is dispatched by the next start call
    dispatched: bool = True

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def check_cancelable(job: InferenceJob) -> None:
    if job.finished:
        raise Invalid(f"inference {job.id} already {job.status.value}: only a queued or running job can be canceled")


def progress_of(step: int, steps: int, eta: float | None) -> JobProgress:
    return JobProgress(step=step, steps=steps, percent=round(100 * step / max(steps, 1), 1), eta=eta)


def endpoint_listed(endpoint: Endpoint, actor: Principal, subject: Principal | None) -> bool:
    """An endpoint is listed to an actor that may use it (shares one of its roles) or sees
    every endpoint (`sagemaker_endpoint:all`); `?username=` (the subject) narrows that to the
    endpoints the named user may use, never widens it."""
    if not (allows(actor.permissions, "sagemaker_endpoint:all") or shares_a_role(endpoint.roles, actor.roles)):
        return False
    return subject is None or shares_a_role(endpoint.roles, subject.roles)


def jobs_listed_owner(actor: Principal, username: str | None) -> str | None:
    """Whose jobs a listing shows: every job (None) with `inference:all`, else the actor's own;
    `?username=` narrows to that user's jobs, and to none at all when the actor may not see
    them (an empty name, which no job has)."""
    if allows(actor.permissions, "inference:all"):
        return username
    if username is None or username == actor.username:
        return actor.username
    return ""


def check_owner(actor: Principal, job: InferenceJob) -> None:
    """Another user's job is not found, unless the actor may see every job."""
    if job.owner != actor.username and not allows(actor.permissions, "inference:all"):
        raise NotFound(f"inference with id {job.id} not found")


PASS_THROUGH_VAES = ("Automatic", "None")
RUNNABLE_TASKS = ("txt2img", "img2img")


def endpoint_name(endpoint_type: EndpointType, name: str | None) -> str:
    """ESD's naming: `esd-<type lowercased>-<name or 7 hex>` (`esd-real-time-test`)."""
    return f"esd-{endpoint_type.value.lower()}-{name or uuid.uuid4().hex[:7]}"


def shares_a_role(owner_roles: Iterable[str], roles: Iterable[str]) -> bool:
    return bool(set(owner_roles) & set(roles))


def endpoint_view(endpoint: Endpoint, current: int) -> EndpointView:
    return EndpointView(
        EndpointDeploymentJobId=endpoint.id,
        endpoint_name=endpoint.name,
        endpoint_type=endpoint.type,
        endpoint_status=endpoint.status,
        instance_type=endpoint.instance_type,
        autoscaling=endpoint.autoscaling,
        min_instance_number=str(endpoint.min),
        max_instance_number=str(endpoint.max),
        current_instance_count=str(current),
        startTime=esd_time(endpoint.created) or "",
        endTime=esd_time(endpoint.ready_at),
        error=endpoint.error,
        owner_group_or_role=endpoint.roles,
    )


def instances_held(endpoint: Endpoint) -> int:
    """Instances an endpoint holds against its type's quota: as many as it may grow to, so that
    autoscaling never passes the quota."""
    return endpoint.max if endpoint.autoscaling else endpoint.initial


def instances_in_use(endpoints: Iterable[Endpoint], instance_type: str) -> int:
    return sum(instances_held(endpoint) for endpoint in endpoints if endpoint.instance_type == instance_type)


def initial_workers(endpoint: Endpoint) -> int:
    """How many workers a new endpoint starts with: its initial count, within its limits when
    it autoscales."""
    if not endpoint.autoscaling:
        return endpoint.initial
    return max(endpoint.min, min(endpoint.initial, endpoint.max))


EXTRA_TASKS = ("extra-single-image", "extra-batch-images", "rembg")


def check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        # ESD's exact phrasing, which clients match on
        raise Invalid(f"task type {task_type} should be in {list(EXTRA_TASKS)} or {list(RUNNABLE_TASKS)}")


def candidate_endpoints(
    endpoints: list[Endpoint],
    *,
    inference_type: EndpointType,
    named: str | None,
    username: str,
    roles: list[str],
) -> list[Endpoint]:
    """Where a job may run: the named endpoint (it must be in service), or every in-service
    endpoint of the type whose roles the user shares; none is a 400 in ESD's words."""
    if named:
        for endpoint in endpoints:
            if endpoint.name == named:
                if endpoint.status != EndpointStatus.IN_SERVICE:
                    raise Invalid(f"endpoint {named} is {endpoint.status.value}, not InService")
                if endpoint.type != inference_type:
                    raise Invalid(f"endpoint {named} is {endpoint.type.value}, not {inference_type.value}")
                return [endpoint]
        raise Invalid(f"endpoint {named} not found")
    found = [
        endpoint
        for endpoint in endpoints
        if endpoint.type == inference_type
        and endpoint.status == EndpointStatus.IN_SERVICE
        and shares_a_role(endpoint.roles, roles)
    ]
    if not found:
        raise Invalid(f'no available {inference_type.value} endpoints for user "{username}"')
    return found


def least_busy(candidates: list[Endpoint], load: dict[str, float]) -> Endpoint:
    """The candidate with the least work per live worker (the first of equals)."""
    return min(candidates, key=lambda endpoint: load.get(endpoint.name, 0.0))


def load_of(queued: int, busy: int, live: int) -> float:
    """Jobs waiting or running, per live worker (an endpoint with no worker yet counts as one)."""
    return (queued + busy) / max(live, 1)


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
    """Generation needs a Stable-diffusion checkpoint; the extras and rembg need none (their
    upscaler or rembg models are named in the payload and checked by the worker)."""
    if task_type in RUNNABLE_TASKS and not [n for n in models.get("Stable-diffusion", []) if n]:
        raise Invalid('models must name a Stable-diffusion checkpoint, e.g. {"Stable-diffusion": ["v1-5.safetensors"]}')


def payload_key(task_type: str, inference_id: str) -> str:
    return f"{task_type}/infer_v2/{inference_id}/api_param.json"


def output_prefix(inference_id: str) -> str:
    return f"out/{inference_id}/result"


def may_use(entry: CatalogEntry, actor: Principal) -> bool:
    """A checkpoint is usable by whom the checkpoint service shows it to: its owners' roles
    (ESD's `allowed_roles_or_users`), or anyone holding `checkpoint:all`."""
    return allows(actor.permissions, "checkpoint:all") or shared_with(entry.allowed_roles, actor.roles, actor.username)
