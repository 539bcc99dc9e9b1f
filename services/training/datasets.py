"""Datasets: a user's training images (and captions) in object storage, uploaded through a
presigned URL per file, Enabled once every file is there."""

from __future__ import annotations

import time

import structlog

from services.training import domain
from services.training.domain import Dataset
from services.training.store import TrainingStore
from shared.contracts.identity import Principal
from shared.contracts.training import (
    CreateDataset,
    CreatedDataset,
    DatasetFileView,
    DatasetList,
    DatasetStatus,
    DatasetSummary,
    DatasetView,
    DeleteDatasets,
    GetDataset,
    ListDatasets,
    UpdateDataset,
    UpdatedDataset,
)
from shared.errors import Invalid, NotFound
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)


class Datasets:
    def __init__(self, store: TrainingStore, storage: ObjectStore) -> None:
        self.store = store
        self.storage = storage

    async def create(self, command: CreateDataset) -> CreatedDataset:
        dataset = Dataset(
            name=command.dataset_name,
            status=DatasetStatus.INITIAL,
            prefix=command.prefix or "",
            files=domain.dataset_files(command.dataset_name, command.prefix, command.content),
            description=str(command.params.get("description", "")),
            owner=command.actor.username,
            roles=command.actor.roles,
            created=time.time(),
        )
        await self.store.add_dataset(dataset)
        urls = {file.filename: await self.storage.presign_put(file.key) for file in dataset.files}
        log.info("dataset.created", dataset=dataset.name, files=len(dataset.files), actor=command.actor.username)
        return CreatedDataset(datasetName=dataset.name, s3PresignUrl=urls)

    async def _get(self, name: str, actor: Principal) -> Dataset:
        """The dataset, if the actor may reach it; another role's is not found."""
        dataset = await self.store.dataset(name)
        if dataset is None or not domain.dataset_reachable(actor, dataset):
            raise NotFound(f"dataset {name} is not found")
        return dataset

    async def update(self, command: UpdateDataset) -> UpdatedDataset:
        dataset = await self._get(command.dataset_name, command.actor)
        if command.status is DatasetStatus.ENABLED:
            missing = [file.filename for file in dataset.files if await self.storage.size(file.key) is None]
            if missing:
                raise Invalid(f"files not uploaded yet: {missing[:20]}")
        await self.store.update_dataset(dataset.name, status=command.status)
        return UpdatedDataset(datasetName=dataset.name, status=command.status)

    def _summary(self, dataset: Dataset) -> DatasetSummary:
        return DatasetSummary(
            datasetName=dataset.name,
            s3=self.storage.uri(domain.dataset_prefix(dataset.name)),
            status=dataset.status,
            timestamp=dataset.created,
            description=dataset.description,
            prefix=dataset.prefix,
        )

    async def list(self, command: ListDatasets) -> DatasetList:
        datasets = domain.visible_datasets(command.actor, await self.store.all_datasets())
        return DatasetList(datasets=[self._summary(dataset) for dataset in datasets])

    async def get(self, command: GetDataset) -> DatasetView:
        dataset = await self._get(command.dataset_name, command.actor)
        files = [
            DatasetFileView(
                key=file.key,
                name=file.name,
                filename=file.filename,
                type=file.type,
                preview_url=await self.storage.presign_get(file.key),
            )
            for file in dataset.files
        ]
        return DatasetView(**self._summary(dataset).model_dump(), dataset_name=dataset.name, data=files)

    async def delete(self, command: DeleteDatasets) -> None:
        for name in dict.fromkeys(command.dataset_name_list):
            dataset = await self.store.dataset(name)
            if dataset is None or not domain.dataset_reachable(command.actor, dataset):
                continue  # another role's dataset is as unknown as a missing one
            await self.storage.delete_prefix(domain.dataset_prefix(name))
            await self.store.remove_dataset(name)
            log.info("dataset.deleted", dataset=name, actor=command.actor.username)
