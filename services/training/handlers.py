"""The training service's subscribers: dataset and training commands from the gateway, the
training workers' reports, and their progress events. A finished LoRA is registered with the
checkpoint service, so it can be used in generation at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import structlog
from faststream.rabbit import RabbitBroker

from shared.contracts import checkpoint as checkpoints
from shared.contracts.identity import Principal
from shared.contracts.training import (
    JOBS,
    SERVICE,
    CreateDataset,
    CreateTraining,
    DatasetStatus,
    DeleteDatasets,
    DeleteTrainings,
    GetDataset,
    GetTraining,
    ListDatasets,
    ListTrainings,
    TrainingCompleted,
    TrainingDecision,
    TrainingDone,
    TrainingError,
    TrainingFailed,
    TrainingProgress,
    TrainingStarted,
    TrainingStatus,
    TrainLora,
    UpdateDataset,
)
from shared.errors import Invalid, NotFound
from shared.esd import decode_position, encode_position, esd_time
from shared.messaging import EventPublisher, Names, RpcClient, register_rpc, send_work
from shared.permissions import allows
from shared.pools import LocalPool
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3
REGISTRATIONS = uuid.UUID("8f6b7c8e-3a52-4d5e-9a0f-1f6c2b1d7e44")  # namespace of LoRA checkpoint ids


def dataset_prefix(name: str) -> str:
    return f"dataset/{name}/"


class Training:
    def __init__(self, store, storage: ObjectStore, events: EventPublisher, broker: RabbitBroker, names: Names, rpc: RpcClient) -> None:
        self.store = store
        self.storage = storage
        self.events = events
        self.broker = broker
        self.names = names
        self.rpc = rpc

    # --- datasets ---

    async def create_dataset(self, command: CreateDataset) -> dict[str, Any]:
        folder = dataset_prefix(command.dataset_name) + (f"{command.prefix}/" if command.prefix else "")
        names = [file.filename for file in command.content]
        if len(set(names)) != len(names):
            raise Invalid("content names a file twice")
        dataset = {
            "name": command.dataset_name,
            "status": DatasetStatus.INITIAL.value,
            "prefix": command.prefix or "",
            "files": [{"filename": f.filename, "key": folder + f.filename, "type": f.type, "name": f.name or f.filename} for f in command.content],
            "description": str(command.params.get("description", "")),
            "owner": command.actor.username,
            "roles": command.actor.roles,
            "created": time.time(),
        }
        await self.store.add_dataset(dataset)
        urls = {file["filename"]: await self.storage.presign_put(file["key"]) for file in dataset["files"]}
        log.info("dataset.created", dataset=command.dataset_name, files=len(names), actor=command.actor.username)
        return {"datasetName": command.dataset_name, "s3PresignUrl": urls}

    async def _dataset(self, name: str) -> dict[str, Any]:
        dataset = await self.store.dataset(name)
        if dataset is None:
            raise NotFound(f"dataset {name} is not found")
        return dataset

    async def update_dataset(self, command: UpdateDataset) -> dict[str, Any]:
        dataset = await self._dataset(command.dataset_name)
        if command.status is DatasetStatus.ENABLED:
            missing = [file["filename"] for file in dataset["files"] if await self.storage.size(file["key"]) is None]
            if missing:
                raise Invalid(f"files not uploaded yet: {missing[:20]}")
        await self.store.update_dataset(dataset["name"], status=command.status.value)
        return {"datasetName": dataset["name"], "status": command.status.value}

    def _summary(self, dataset: dict[str, Any]) -> dict[str, Any]:
        return {
            "datasetName": dataset["name"],
            "s3": self.storage.uri(dataset_prefix(dataset["name"])),
            "status": dataset["status"],
            "timestamp": dataset["created"],
            "description": dataset["description"],
            "prefix": dataset["prefix"],
        }

    async def list_datasets(self, command: ListDatasets) -> dict[str, Any]:
        everything = allows(command.actor.permissions, "train:all")
        datasets = [d for d in await self.store.all_datasets() if everything or d["owner"] == command.actor.username]
        return {"datasets": [self._summary(d) for d in datasets], "last_evaluated_key": None}

    async def get_dataset(self, command: GetDataset) -> dict[str, Any]:
        dataset = await self._dataset(command.dataset_name)
        files = [
            {"key": file["key"], "name": file["name"], "filename": file["filename"], "type": file["type"],
             "preview_url": await self.storage.presign_get(file["key"])}
            for file in dataset["files"]
        ]
        return {**self._summary(dataset), "dataset_name": dataset["name"], "data": files}

    async def delete_datasets(self, command: DeleteDatasets) -> None:
        for name in dict.fromkeys(command.dataset_name_list):
            if await self.store.dataset(name) is None:
                continue
            await self.storage.delete_prefix(dataset_prefix(name))
            await self.store.remove_dataset(name)
            log.info("dataset.deleted", dataset=name, actor=command.actor.username)

    # --- trainings ---

    async def create_training(self, command: CreateTraining) -> dict[str, Any]:
        params = command.params.training_params
        model_key, model_name = await self._base_model(command.actor, params.model, params.s3_model_path)
        data_prefix = await self._data(params.dataset, params.s3_data_path)
        training_id = str(uuid.uuid4())
        output_prefix = f"kohya/train/{training_id}/output"
        training = {
            "id": training_id,
            "status": TrainingStatus.INITIAL.value,
            "owner": command.actor.username,
            "roles": command.actor.roles,
            "params": command.params.model_dump(mode="json"),
            "model_key": model_key,
            "model_name": model_name,
            "data_prefix": data_prefix,
            "output_prefix": output_prefix,
            "fm_type": params.fm_type,
            "created": time.time(),
            "attempts": 0,
        }
        await self.store.add_training(training)
        await send_work(self.broker, self.names, JOBS, TrainLora(
            training_id=training_id, model_key=model_key, model_name=model_name, data_prefix=data_prefix,
            output_prefix=output_prefix, config_params=command.params.config_params, fm_type=params.fm_type,
        ))
        log.info("training.queued", training_id=training_id, actor=command.actor.username)
        return {
            "id": training_id,
            "status": training["status"],
            "params": training["params"],
            "input_location": self.storage.uri(data_prefix),
            "output_location": self.storage.uri(output_prefix),
        }

    async def _base_model(self, actor: Principal, name: str | None, s3_path: str | None) -> tuple[str, str]:
        if name:
            try:
                item = await self.rpc.call(
                    checkpoints.SERVICE, "find",
                    checkpoints.FindCheckpoint(actor=actor, checkpoint_type=checkpoints.CheckpointType.STABLE_DIFFUSION, name=name),
                    checkpoints.CheckpointItem,
                )
            except NotFound as missing:  # for this request, a bad base model is a bad input
                raise Invalid(missing.message) from None
            return f"{item.s3Location.split('/', 3)[3]}/{name}", name
        key = self._key_in_bucket(s3_path or "")
        if await self.storage.size(key) is None:
            raise Invalid(f"s3_model_path {s3_path} does not exist")
        return key, key.rsplit("/", 1)[-1]

    async def _data(self, dataset: str | None, s3_path: str | None) -> str:
        if dataset:
            found = await self.store.dataset(dataset)
            if found is None:
                raise Invalid(f"dataset {dataset} is not found")
            if found["status"] != DatasetStatus.ENABLED:
                raise Invalid(f"dataset {dataset} is not Enabled yet: upload its files, then PUT status Enabled")
            return dataset_prefix(dataset)
        prefix = self._key_in_bucket(s3_path or "").rstrip("/") + "/"
        if not await self.storage.keys(prefix):
            raise Invalid(f"s3_data_path {s3_path} holds no files")
        return prefix

    def _key_in_bucket(self, s3_path: str) -> str:
        bucket_prefix = f"s3://{self.storage.bucket}/"
        if not s3_path.startswith(bucket_prefix) or ".." in s3_path.split("/"):
            raise Invalid(f"{s3_path} is not a path in this platform's bucket ({bucket_prefix}...)")
        return s3_path.removeprefix(bucket_prefix)

    def _view(self, training: dict[str, Any]) -> dict[str, Any]:
        view = {
            "id": training["id"],
            "job_status": training["status"],
            "status": training["status"],
            "model_id": training.get("model_name"),
            "params": training["params"],
            "input_location": self.storage.uri(training["data_prefix"]),
            "output_location": self.storage.uri(training["output_prefix"]),
            "checkpoint_id": training.get("checkpoint_id"),
            "timestamp": training["created"],
            "created": esd_time(training["created"]),
            "completed": esd_time(training.get("completed")),
            "owner": training["owner"],
        }
        for optional in ("error", "progress", "lora_name", "info"):
            if training.get(optional) is not None:
                view[optional] = training[optional]
        return view

    async def _training(self, actor: Principal, training_id: str) -> dict[str, Any]:
        training = await self.store.training(training_id)
        if training is None or (training["owner"] != actor.username and not allows(actor.permissions, "train:all")):
            raise NotFound(f"Job with id {training_id} not found")
        return training

    async def get_training(self, command: GetTraining) -> dict[str, Any]:
        return self._view(await self._training(command.actor, command.training_id))

    async def list_trainings(self, command: ListTrainings) -> dict[str, Any]:
        limit = max(1, min(command.limit, 100))
        rows = await self.store.page(owner=None, before=decode_position(command.exclusive_start_key), limit=limit)
        more, rows = len(rows) > limit, rows[:limit]
        return {"trainings": [self._view(row) for row in rows], "last_evaluated_key": encode_position(rows[-1]["created"]) if more else None}

    async def delete_trainings(self, command: DeleteTrainings) -> None:
        for training_id in dict.fromkeys(command.training_id_list):
            training = await self.store.training(training_id)
            if training is None:
                continue
            await self.storage.delete_prefix(training["output_prefix"] + "/")
            await self.store.remove_training(training_id)
            log.info("training.deleted", training_id=training_id, actor=command.actor.username)

    # --- worker reports ---

    async def job_started(self, report: TrainingStarted) -> TrainingDecision:
        training = await self.store.training(report.training_id)
        if training is None:
            return TrainingDecision(run=False, reason="the training was deleted")
        if training["status"] in (TrainingStatus.COMPLETED, TrainingStatus.FAILED, TrainingStatus.STOPPED):
            return TrainingDecision(run=False, reason=f"the training is {training['status']}")
        if await self.store.count_attempt(report.training_id) > MAX_ATTEMPTS:
            await self._fail(training, f"gave up after {MAX_ATTEMPTS} attempts: workers stopped while training")
            return TrainingDecision(run=False, reason="too many attempts")
        await self.store.update_training(report.training_id, status=TrainingStatus.TRAINING.value, worker_id=report.worker_id, started=time.time())
        return TrainingDecision(run=True)

    async def job_done(self, report: TrainingDone) -> None:
        training = await self.store.training(report.training_id)
        if training is None or training["status"] == TrainingStatus.COMPLETED:
            return
        owner = Principal(username=training["owner"], roles=training["roles"], permissions=[])
        item = await self.rpc.call(
            checkpoints.SERVICE, "register",
            checkpoints.RegisterCheckpoint(
                actor=owner,
                checkpoint_id=str(uuid.uuid5(REGISTRATIONS, training["id"])),
                checkpoint_type=checkpoints.CheckpointType.LORA,
                name=report.final_key.rsplit("/", 1)[-1],
                source_key=report.final_key,
                params={"message": f"trained by training {training['id']}", "training_id": training["id"]},
            ),
            checkpoints.CheckpointItem,
            timeout=120,
        )
        if await self.store.transition(
            training["id"], [TrainingStatus.TRAINING.value, TrainingStatus.INITIAL.value],
            status=TrainingStatus.COMPLETED.value, completed=time.time(), checkpoint_id=item.id,
            lora_name=item.name[0], output_keys=report.output_keys, info=report.info,
        ):
            log.info("training.completed", training_id=training["id"], checkpoint_id=item.id, lora=item.name[0])
            await self.events.publish(TrainingCompleted(training_id=training["id"], checkpoint_id=item.id, lora_name=item.name[0], owner=training["owner"]))

    async def job_failed(self, report: TrainingError) -> None:
        training = await self.store.training(report.training_id)
        if training is not None:
            await self._fail(training, report.error)

    async def _fail(self, training: dict[str, Any], error: str) -> None:
        if await self.store.transition(
            training["id"], [TrainingStatus.TRAINING.value, TrainingStatus.INITIAL.value],
            status=TrainingStatus.FAILED.value, completed=time.time(), error=error,
        ):
            log.warning("training.failed", training_id=training["id"], error=error)
            await self.events.publish(TrainingFailed(training_id=training["id"], error=error, owner=training["owner"]))

    async def on_progress(self, event: TrainingProgress) -> None:
        await self.store.update_training(event.training_id, progress=event.model_dump(mode="json"))


async def keep_workers(pool: LocalPool, count: int, interval: float = 2.0) -> None:
    """The training pool stays at its size: a worker that died is replaced."""
    while True:
        await pool.scale("training", count)
        await asyncio.sleep(interval)


def register(broker: RabbitBroker, names: Names, training: Training) -> None:
    register_rpc(broker, names, SERVICE, {
        "create_dataset": training.create_dataset,
        "update_dataset": training.update_dataset,
        "list_datasets": training.list_datasets,
        "get_dataset": training.get_dataset,
        "delete_datasets": training.delete_datasets,
        "create": training.create_training,
        "get": training.get_training,
        "list": training.list_trainings,
        "delete": training.delete_trainings,
        "job_started": training.job_started,
        "job_done": training.job_done,
        "job_failed": training.job_failed,
    })
    broker.subscriber(names.event_queue(SERVICE, "progress", TrainingProgress.routing_key), names.events)(training.on_progress)
