"""The training service's wire contracts: datasets, LoRA training jobs, what passes between
the service and its workers, and the events clients follow."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from shared.contracts.checkpoint import PLAIN_NAME_PATTERN, FileName, safe_file_name
from shared.contracts.identity import Body, Idempotent, Principal, WebhookEvent, WebhookUrl
from shared.contracts.kohya import InvalidTrainingConfig, TrainingConfig
from shared.contracts.workers import GoAhead
from shared.messaging import Event
from shared.rpc import command

SERVICE = "training"
JOBS = "training.jobs"
HEARTBEATS = "training.heartbeat"
POOL = "training"  # the training workers' pool
DATASET_FILE_TYPES = ("image", "text")


class DatasetStatus(StrEnum):
    INITIAL = "Initialed"  # ESD's spelling
    ENABLED = "Enabled"


class TrainingStatus(StrEnum):
    INITIAL = "Initial"
    TRAINING = "Training"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"


def _folder(value: str) -> str:
    """A dataset name or kohya folder (`10_technic`): one plain path segment."""
    return safe_file_name(value)


Folder = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128),
    Field(json_schema_extra={"pattern": PLAIN_NAME_PATTERN}),
    AfterValidator(_folder),
]


# --- HTTP bodies -------------------------------------------------------------------------


class DatasetFile(Body):
    filename: FileName
    name: str | None = None
    type: str = "image"
    params: dict[str, Any] = Field(default_factory=dict)


class CreateDatasetBody(Body):
    dataset_name: Folder
    content: Annotated[list[DatasetFile], Field(min_length=1, max_length=2000)]
    prefix: Folder | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class UpdateDatasetBody(Body):
    status: DatasetStatus


class DeleteDatasetsBody(Body):
    dataset_name_list: Annotated[list[Folder], Field(min_length=1, max_length=100)]


def _one_of(*fields: str) -> dict[str, Any]:
    return {
        "anyOf": [{"required": [name], "properties": {name: {"type": "string", "minLength": 1}}} for name in fields]
    }


class TrainingParams(Body):
    # what the validator below asks, as the OpenAPI document can say it
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"allOf": [_one_of("model", "s3_model_path"), _one_of("dataset", "s3_data_path")]},
    )

    training_instance_type: str = "local"
    fm_type: str = Field("sd_1_5", json_schema_extra={"enum": ["sd_1_5", "sd_xl"]})
    model: str | None = None  # an Active Stable-diffusion checkpoint's file name
    s3_model_path: str | None = None
    dataset: str | None = None  # a dataset name
    s3_data_path: str | None = None

    @model_validator(mode="after")
    def _sources(self) -> TrainingParams:
        if not (self.model or self.s3_model_path):
            raise ValueError("params.training_params needs the base model: model or s3_model_path")
        if not (self.dataset or self.s3_data_path):
            raise ValueError("params.training_params needs the data: dataset or s3_data_path")
        if self.fm_type not in ("sd_1_5", "sd_xl"):
            raise ValueError(f"fm_type {self.fm_type} should be in ['sd_1_5', 'sd_xl']")
        return self


class TrainingJobParams(Body):
    training_params: TrainingParams
    config_params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _config_trains(self) -> TrainingJobParams:
        # the worker trains by these same rules: a bad argument is a 400 now, not a failed job later
        try:
            TrainingConfig.from_esd(self.config_params, fm_type=self.training_params.fm_type)
        except InvalidTrainingConfig as error:
            raise PydanticCustomError("config_params", "config_params.{problem}", {"problem": error.message}) from None
        return self


class CreateTrainingBody(Body):
    """ESD's body, plus cog's `webhook` and `webhook_events_filter` (see CreateInferenceBody)."""

    lora_train_type: Annotated[str, StringConstraints(pattern=r"^kohya$")] = "kohya"
    params: TrainingJobParams
    webhook: WebhookUrl | None = None
    webhook_events_filter: list[WebhookEvent] | None = None


class DeleteTrainingsBody(Body):
    training_id_list: Annotated[
        list[Annotated[str, StringConstraints(min_length=1, max_length=64)]], Field(min_length=1, max_length=100)
    ]


# --- commands (RPC) ------------------------------------------------------------------------


class CreateDataset(CreateDatasetBody, Idempotent):
    actor: Principal


class UpdateDataset(UpdateDatasetBody):
    actor: Principal
    dataset_name: str


class GetDataset(BaseModel):
    actor: Principal
    dataset_name: str


class ListDatasets(BaseModel):
    actor: Principal


class DeleteDatasets(DeleteDatasetsBody):
    actor: Principal


class CreateTraining(CreateTrainingBody, Idempotent):
    actor: Principal


class GetTraining(BaseModel):
    actor: Principal
    training_id: str


class ListTrainings(BaseModel):
    actor: Principal
    limit: int = 10
    exclusive_start_key: str | None = None


class DeleteTrainings(DeleteTrainingsBody):
    actor: Principal


class StopTraining(BaseModel):
    actor: Principal
    training_id: str


# --- replies -------------------------------------------------------------------------------


class CreatedDataset(BaseModel):
    datasetName: str
    s3PresignUrl: dict[str, str]  # file name -> presigned PUT URL


class UpdatedDataset(BaseModel):
    datasetName: str
    status: DatasetStatus


class DatasetSummary(BaseModel):
    datasetName: str
    s3: str
    status: DatasetStatus
    timestamp: float
    description: str
    prefix: str


class DatasetList(BaseModel):
    datasets: list[DatasetSummary]
    last_evaluated_key: str | None = None


class DatasetFileView(BaseModel):
    key: str
    name: str
    filename: str
    type: str
    preview_url: str


class DatasetView(DatasetSummary):
    dataset_name: str
    data: list[DatasetFileView]


class CreatedTraining(BaseModel):
    id: str
    status: TrainingStatus
    params: dict[str, Any]
    input_location: str
    output_location: str


class TrainingProgressView(BaseModel):
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    percent: float = 0.0
    eta: float | None = None  # seconds left, as far as the steps so far tell


def _absent(value: Any) -> bool:
    return value is None


class TrainingView(BaseModel):
    """A training as `GET /trainings/{id}` shows it; `error`, `progress`, `lora_name` and
    `info` appear only when there is something to say."""

    id: str
    job_status: TrainingStatus
    status: TrainingStatus
    model_id: str | None
    params: dict[str, Any]
    input_location: str
    output_location: str
    checkpoint_id: str | None
    timestamp: float
    created: str | None
    completed: str | None
    owner: str
    error: str | None = Field(None, exclude_if=_absent)
    progress: TrainingProgressView | None = Field(None, exclude_if=_absent)
    lora_name: str | None = Field(None, exclude_if=_absent)
    info: dict[str, Any] | None = Field(None, exclude_if=_absent)
    stop_requested: bool | None = Field(None, exclude_if=_absent)
    saved_checkpoint_ids: list[str] | None = Field(None, exclude_if=_absent)  # a stopped training's epochs


class TrainingPage(BaseModel):
    trainings: list[TrainingView]
    last_evaluated_key: str | None = None


# --- between the service and its workers ---------------------------------------------------


class RunTraining(BaseModel):
    """Sent to `training.jobs`: everything a training worker needs."""

    training_id: str
    owner: str = ""  # named in the training's events
    model_key: str
    model_name: str
    data_prefix: str  # every object under it is the dataset, kohya folders kept
    output_prefix: str
    config_params: dict[str, Any]
    fm_type: str


class ReportTrainingStarted(BaseModel):
    """A worker took the training: may it run it?"""

    training_id: str
    worker_id: str


class ReportTrainingSucceeded(BaseModel):
    training_id: str
    worker_id: str
    final_key: str
    output_keys: list[str]
    info: dict[str, Any] = Field(default_factory=dict)


class ReportTrainingFailed(BaseModel):
    training_id: str
    worker_id: str
    error: str


class ReportTrainingStopped(BaseModel):
    """The worker stopped as asked; the epochs it had saved are in storage."""

    training_id: str
    worker_id: str
    saved_keys: list[str]


# --- events --------------------------------------------------------------------------------


class TrainingCreated(Event):
    routing_key = "training.created"
    training_id: str
    owner: str
    webhook: str | None = None
    webhook_events_filter: list[WebhookEvent] | None = None


class TrainingStarted(Event):
    routing_key = "training.started"
    training_id: str
    worker_id: str
    owner: str


class TrainingProgress(Event):
    routing_key = "training.progress"
    training_id: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    owner: str = ""
    eta: float | None = None  # seconds left


class TrainingStopRequested(Event):
    """For the worker running the training: stop at the next step."""

    routing_key = "training.stop_requested"
    training_id: str
    owner: str


class TrainingStopped(Event):
    routing_key = "training.stopped"
    training_id: str
    owner: str
    checkpoint_ids: list[str]  # the epochs saved before the stop, each an Active Lora


class TrainingCompleted(Event):
    routing_key = "training.completed"
    training_id: str
    checkpoint_id: str
    lora_name: str
    owner: str


class TrainingFailed(Event):
    routing_key = "training.failed"
    training_id: str
    error: str
    owner: str


# --- the commands (request -> reply) ---------------------------------------------------------

CREATE_DATASET = command(SERVICE, CreateDataset, CreatedDataset)
UPDATE_DATASET = command(SERVICE, UpdateDataset, UpdatedDataset)
GET_DATASET = command(SERVICE, GetDataset, DatasetView)
LIST_DATASETS = command(SERVICE, ListDatasets, DatasetList)
DELETE_DATASETS = command(SERVICE, DeleteDatasets)
CREATE_TRAINING = command(SERVICE, CreateTraining, CreatedTraining)
GET_TRAINING = command(SERVICE, GetTraining, TrainingView)
LIST_TRAININGS = command(SERVICE, ListTrainings, TrainingPage)
DELETE_TRAININGS = command(SERVICE, DeleteTrainings)
STOP_TRAINING = command(SERVICE, StopTraining, TrainingView)
# from the workers
REPORT_TRAINING_STARTED = command(SERVICE, ReportTrainingStarted, GoAhead)
REPORT_TRAINING_SUCCEEDED = command(SERVICE, ReportTrainingSucceeded)
REPORT_TRAINING_FAILED = command(SERVICE, ReportTrainingFailed)
REPORT_TRAINING_STOPPED = command(SERVICE, ReportTrainingStopped)
