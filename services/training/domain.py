"""The training service's records (datasets, training jobs) and its decisions: where a
dataset's files go, who sees which training, and how they look to ESD clients. Pure: no I/O."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.identity import Principal
from shared.contracts.training import DatasetStatus, TrainingProgressView, TrainingStatus
from shared.errors import Invalid, NotFound
from shared.permissions import allows

# namespace of the ids of the LoRA checkpoints trainings register: one id per training, so a
# repeated registration registers once
REGISTRATIONS = uuid.UUID("8f6b7c8e-3a52-4d5e-9a0f-1f6c2b1d7e44")
FINISHED = (TrainingStatus.COMPLETED, TrainingStatus.FAILED, TrainingStatus.STOPPED)
UNFINISHED = (TrainingStatus.TRAINING, TrainingStatus.INITIAL)


class Record(BaseModel):
    # stored documents carry MongoDB's `_id` and, after upgrades, fields a record no longer has
    model_config = ConfigDict(extra="ignore")


class StoredFile(Record):
    filename: str
    key: str
    type: str
    name: str


class Dataset(Record):
    name: str
    status: DatasetStatus
    prefix: str  # the kohya folder (`10_concept`) or ""
    files: list[StoredFile]
    description: str
    owner: str
    roles: list[str]
    created: float


class TrainingJob(Record):
    id: str
    status: TrainingStatus
    owner: str
    roles: list[str]
    params: dict[str, Any]
    model_key: str
    model_name: str
    data_prefix: str
    output_prefix: str
    fm_type: str
    created: float
    attempts: int = 0
    worker_id: str | None = None
    started: float | None = None
    completed: float | None = None
    checkpoint_id: str | None = None
    lora_name: str | None = None
    output_keys: list[str] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    progress: TrainingProgressView | None = None
    stop_requested: bool = False
    saved_checkpoint_ids: list[str] = Field(default_factory=list)


def dataset_prefix(name: str) -> str:
    return f"dataset/{name}/"


def dataset_of(prefix: str) -> tuple[str | None, str]:
    """The dataset a key prefix lies in, and the folder under it (`dataset/d/5_cat/` ->
    `("d", "5_cat/")`); None when the prefix is in no dataset."""
    top, _, rest = prefix.partition("/")
    name, _, subfolder = rest.partition("/")
    if top != "dataset" or not name:
        return None, ""
    return name, subfolder


def dataset_files(name: str, prefix: str | None, files) -> list[StoredFile]:
    """Where each of a new dataset's files goes (under the kohya folder, if one is given); a
    file named twice is a 400."""
    names = [file.filename for file in files]
    if len(set(names)) != len(names):
        raise Invalid("content names a file twice")
    folder = dataset_prefix(name) + (f"{prefix}/" if prefix else "")
    return [
        StoredFile(filename=file.filename, key=folder + file.filename, type=file.type, name=file.name or file.filename)
        for file in files
    ]


def dataset_reachable(actor: Principal, dataset: Dataset) -> bool:
    """A dataset belongs to its creator's roles (ESD's `allowed_roles_or_users`): its creator
    and the users sharing one of those roles reach it; `train:all` is not enough for another
    role's images. `user:all` is: ESD's superuser, who can take over any account anyway."""
    return (
        dataset.owner == actor.username
        or bool(set(dataset.roles) & set(actor.roles))
        or allows(actor.permissions, "user:all")
    )


def visible_datasets(actor: Principal, datasets: list[Dataset]) -> list[Dataset]:
    return [dataset for dataset in datasets if dataset_reachable(actor, dataset)]


def check_visible(actor: Principal, training: TrainingJob | None, training_id: str) -> TrainingJob:
    """Another user's training is not found, unless the actor may see every training."""
    if training is None or (training.owner != actor.username and not allows(actor.permissions, "train:all")):
        raise NotFound(f"Job with id {training_id} not found")
    return training


def output_prefix(training_id: str) -> str:
    return f"kohya/train/{training_id}/output"


def default_output_name(training_id: str) -> str:
    """The LoRA's name when the training does not give one."""
    return f"lora-{training_id[:8]}"


def lora_file_name(output_name: str) -> str:
    """The file a training's LoRA is saved as (kohya's `<output_name>.safetensors`)."""
    return f"{output_name}.safetensors"


def lora_checkpoint_id(training_id: str, key: str | None = None) -> str:
    """The id of the LoRA checkpoint a training registers: its final file's, or (`key`) one of
    the epochs a stopped training had saved."""
    return str(uuid.uuid5(REGISTRATIONS, training_id if key is None else f"{training_id}/{key}"))


def check_stoppable(training: TrainingJob) -> None:
    if training.status in FINISHED:
        raise Invalid(
            f"training {training.id} is already {training.status.value}: only a queued or running training can be stopped"
        )


def progress_of(epoch: int, epochs: int, step: int, steps: int, loss: float, eta: float | None) -> TrainingProgressView:
    return TrainingProgressView(
        epoch=epoch,
        epochs=epochs,
        step=step,
        steps=steps,
        loss=loss,
        percent=round(100 * step / max(steps, 1), 1),
        eta=eta,
    )
