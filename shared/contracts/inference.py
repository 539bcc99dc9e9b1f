"""The inference service's wire contracts: endpoints (worker pools) and inference jobs, the
commands between gateway, service and workers, and the events clients follow."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, WithJsonSchema, model_validator

from shared.contracts.checkpoint import CheckpointType
from shared.contracts.identity import Body, Idempotent, Principal, WebhookEvent, WebhookUrl
from shared.contracts.workers import GoAhead
from shared.messaging import Event
from shared.rpc import command

SERVICE = "inference"
HEARTBEATS = "inference.heartbeat"
TASK_TYPES = ("txt2img", "img2img", "extra-single-image", "extra-batch-images", "rembg")


def queue_of(endpoint_name: str) -> str:
    """The work queue of an endpoint's pool: its depth is what scales the pool."""
    return f"inference.{endpoint_name}"


class EndpointType(StrEnum):
    REAL_TIME = "Real-time"
    ASYNC = "Async"


class EndpointStatus(StrEnum):
    CREATING = "Creating"
    IN_SERVICE = "InService"
    FAILED = "Failed"
    DELETING = "Deleting"


class JobStatus(StrEnum):
    CREATED = "created"
    IN_PROGRESS = "inprogress"
    SUCCEEDED = "succeed"  # ESD's spelling
    FAILED = "failed"
    CANCELED = "canceled"


FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


def _int_from_string(value: Any) -> Any:
    # ESD clients send counts as strings ("1")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _count(minimum: int, maximum: int) -> Any:
    """An instance count from `minimum` to `maximum` (at most 100), as an integer or, as ESD
    clients send it, a string of digits; documented as either."""
    digits = {0: "100|[1-9]?[0-9]", 1: "100|[1-9][0-9]?"}[minimum] if maximum == 100 else "[0-9]+"
    return Annotated[
        int,
        BeforeValidator(_int_from_string),
        Field(ge=minimum, le=maximum),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": minimum, "maximum": maximum},
                    {"type": "string", "pattern": f"^({digits})$"},
                ]
            }
        ),
    ]


RoleName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


# --- HTTP bodies -------------------------------------------------------------------------


class CreateEndpointBody(Body):
    endpoint_name: Annotated[str, StringConstraints(max_length=20, pattern=r"^[A-Za-z0-9-]*$")] | None = None
    endpoint_type: EndpointType
    instance_type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    initial_instance_count: _count(1, 100)
    autoscaling_enabled: bool = False
    assign_to_roles: Annotated[list[RoleName], Field(min_length=1, max_length=10)]
    min_instance_number: _count(0, 100) | None = None
    max_instance_number: _count(1, 100) | None = None

    @model_validator(mode="after")
    def _limits(self) -> CreateEndpointBody:
        minimum, maximum = self.limits()
        if minimum > maximum:
            raise ValueError(f"min_instance_number {minimum} is above max_instance_number {maximum}")
        if self.autoscaling_enabled and self.endpoint_type is EndpointType.REAL_TIME and minimum < 1:
            raise ValueError("a Real-time endpoint with autoscaling needs min_instance_number >= 1")
        return self

    def limits(self) -> tuple[int, int]:
        default_min = 0 if self.endpoint_type is EndpointType.ASYNC else 1
        minimum = self.min_instance_number if self.min_instance_number is not None else default_min
        maximum = (
            self.max_instance_number
            if self.max_instance_number is not None
            else max(self.initial_instance_count, minimum, 1)
        )
        return minimum, maximum


class DeleteEndpointsBody(Body):
    endpoint_name_list: Annotated[list[RoleName], Field(min_length=1, max_length=10)]


class CreateInferenceBody(Body):
    """ESD's body, plus Replicate cog's `webhook` and `webhook_events_filter` (the job's
    `start`, `progress` and `completed` events, signed, POSTed to the URL)."""

    task_type: str = Field(json_schema_extra={"enum": list(TASK_TYPES)})  # checked with ESD's message
    inference_type: EndpointType
    models: dict[str, list[str]] = Field(default_factory=dict)
    sagemaker_endpoint_name: str | None = None
    payload_string: str | None = None
    webhook: WebhookUrl | None = None
    webhook_events_filter: list[WebhookEvent] | None = None
    # a small approximate image in the progress event every this many steps (none by default)
    preview_every: Annotated[int, Field(ge=1, le=1000)] | None = None


class DeleteInferencesBody(Body):
    inference_id_list: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=64)]], Field(min_length=1, max_length=100)
    ]


# --- commands (RPC) ------------------------------------------------------------------------


class CreateEndpoint(CreateEndpointBody, Idempotent):
    actor: Principal


class ListEndpoints(BaseModel):
    actor: Principal
    # `?username=`, resolved by the gateway: only the endpoints this user may use (and the actor may see)
    subject: Principal | None = None
    limit: int = 10
    exclusive_start_key: str | None = None


class DeleteEndpoints(DeleteEndpointsBody):
    actor: Principal


class CreateInference(CreateInferenceBody, Idempotent):
    actor: Principal


class StartInference(BaseModel):
    actor: Principal
    inference_id: str


class GetInference(BaseModel):
    actor: Principal
    inference_id: str


class ListInferences(BaseModel):
    actor: Principal
    task_type: str = "txt2img"
    username: str | None = None
    limit: int = 10
    exclusive_start_key: str | None = None


class DeleteInferences(DeleteInferencesBody):
    actor: Principal


class CancelInference(BaseModel):
    actor: Principal
    inference_id: str


# --- replies -------------------------------------------------------------------------------


class EndpointView(BaseModel):
    EndpointDeploymentJobId: str
    endpoint_name: str
    endpoint_type: EndpointType
    endpoint_status: EndpointStatus
    instance_type: str
    autoscaling: bool
    min_instance_number: str
    max_instance_number: str
    current_instance_count: str
    startTime: str
    endTime: str | None = None
    status: str | None = None
    error: str | None = None
    owner_group_or_role: list[str]


class EndpointPage(BaseModel):
    endpoints: list[EndpointView]
    last_evaluated_key: str | None = None


class ModelRef(BaseModel):
    """A checkpoint a job uses, as ESD lists it: one entry per type with its file names."""

    id: str
    name: list[str]
    type: str


class CreatedInference(BaseModel):
    """ESD's `data.inference` of POST /inferences: where to upload the job's parameters."""

    id: str
    type: str
    api_params_s3_location: str
    api_params_s3_upload_url: str
    models: list[ModelRef]


class InferenceStart(BaseModel):
    inference_id: str
    status: JobStatus
    endpoint_name: str
    output_path: str


class StartedInference(BaseModel):
    inference: InferenceStart
    inference_type: EndpointType


class UsedModel(BaseModel):
    s3: str
    id: str
    model_name: str
    type: str


class InferenceParams(BaseModel):
    input_body_presign_url: str
    input_body_s3: str
    used_models: dict[str, list[UsedModel]]
    sagemaker_inference_endpoint_id: str
    sagemaker_inference_endpoint_name: str
    sagemaker_inference_instance_type: str


class JobProgress(BaseModel):
    step: int
    steps: int
    percent: float
    eta: float | None = None  # seconds left, as far as the steps so far tell


def _absent(value: Any) -> bool:
    return value is None


class InferenceView(BaseModel):
    """A job as `GET /inferences/{id}` shows it (ESD's field names); `error`, `progress` and
    `info` appear only when there is something to say."""

    img_presigned_urls: list[str]
    output_presigned_urls: list[str]
    inference_info_name: str
    InferenceJobId: str
    status: JobStatus
    taskType: str
    inference_type: EndpointType
    createTime: str | None
    startTime: str | None
    completeTime: str | None
    image_names: list[str]
    owner_group_or_role: list[str]
    params: InferenceParams
    error: str | None = Field(None, exclude_if=_absent)
    progress: JobProgress | None = Field(None, exclude_if=_absent)
    info: dict[str, Any] | None = Field(None, exclude_if=_absent)


class InferencePage(BaseModel):
    inferences: list[InferenceView]
    last_evaluated_key: str | None = None


# --- between the service and its workers ---------------------------------------------------


class ModelFile(BaseModel):
    type: CheckpointType
    checkpoint_id: str
    name: str
    key: str  # object key of the file
    size: int | None = None


class RunInference(BaseModel):
    """What a worker needs to run one job; sent to `inference.<endpoint>`."""

    inference_id: str
    task_type: str
    payload_key: str
    output_prefix: str
    models: list[ModelFile]
    owner: str = ""  # named in the job's events, so that only its owner's streams carry them
    preview_every: int | None = None


class ReportInferenceStarted(BaseModel):
    """A worker took the job: may it run it? (A redelivered job that already finished may not.)"""

    inference_id: str
    worker_id: str


class ReportInferenceSucceeded(BaseModel):
    """Object keys, never the payload's data: a prompt may be long and repeated per image, and
    a report must fit in a broker message. The service reads `info` from `info_key` (the
    `<id>_param.json` the worker stored); `info` is what older workers sent."""

    inference_id: str
    worker_id: str
    image_names: list[str]
    info: dict[str, Any] = Field(default_factory=dict)
    info_key: str | None = None


class ReportInferenceFailed(BaseModel):
    inference_id: str
    worker_id: str
    error: str


# --- events --------------------------------------------------------------------------------


class InferenceCreated(Event):
    routing_key = "inference.created"
    inference_id: str
    task_type: str
    endpoint_name: str
    owner: str
    webhook: str | None = None
    webhook_events_filter: list[WebhookEvent] | None = None


class InferenceStarted(Event):
    routing_key = "inference.started"
    inference_id: str
    endpoint_name: str
    worker_id: str
    owner: str = ""


class InferenceProgress(Event):
    routing_key = "inference.progress"
    inference_id: str
    step: int
    total: int
    owner: str = ""
    eta: float | None = None  # seconds left
    preview: str | None = None  # a small approximate image (data URL), when the job asks for one


class InferenceCanceled(Event):
    routing_key = "inference.canceled"
    inference_id: str
    endpoint_name: str
    owner: str


class InferenceSucceeded(Event):
    routing_key = "inference.succeeded"
    inference_id: str
    endpoint_name: str
    image_keys: list[str]
    owner: str


class InferenceFailed(Event):
    routing_key = "inference.failed"
    inference_id: str
    endpoint_name: str
    error: str
    owner: str


class EndpointChanged(Event):
    endpoint_name: str
    endpoint_status: EndpointStatus
    current_instance_count: int


class EndpointInService(EndpointChanged):
    routing_key = "endpoint.in_service"


class EndpointFailed(EndpointChanged):
    routing_key = "endpoint.failed"


class EndpointDeleted(EndpointChanged):
    routing_key = "endpoint.deleted"


# --- the commands (request -> reply) ---------------------------------------------------------

CREATE_ENDPOINT = command(SERVICE, CreateEndpoint, EndpointView)
LIST_ENDPOINTS = command(SERVICE, ListEndpoints, EndpointPage)
DELETE_ENDPOINTS = command(SERVICE, DeleteEndpoints)
CREATE_INFERENCE = command(SERVICE, CreateInference, CreatedInference)
START_INFERENCE = command(SERVICE, StartInference, StartedInference)
GET_INFERENCE = command(SERVICE, GetInference, InferenceView)
LIST_INFERENCES = command(SERVICE, ListInferences, InferencePage)
DELETE_INFERENCES = command(SERVICE, DeleteInferences)
CANCEL_INFERENCE = command(SERVICE, CancelInference, InferenceView)
# from the workers
REPORT_INFERENCE_STARTED = command(SERVICE, ReportInferenceStarted, GoAhead)
REPORT_INFERENCE_SUCCEEDED = command(SERVICE, ReportInferenceSucceeded)
REPORT_INFERENCE_FAILED = command(SERVICE, ReportInferenceFailed)
