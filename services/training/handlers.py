"""Where the training service's messages enter: dataset and training commands from the
gateway, the training workers' reports, and their progress events. Each is handed to the use
case that answers it."""

from __future__ import annotations

from services.training.datasets import Datasets
from services.training.trainings import Trainings
from shared.contracts import training as contract
from shared.idempotency import Idempotency
from shared.service import Runtime


def register(runtime: Runtime, datasets: Datasets, trainings: Trainings, once: Idempotency) -> None:
    runtime.rpc.register_all(
        {
            contract.CREATE_DATASET: once.wrap(contract.CREATE_DATASET, datasets.create),
            contract.UPDATE_DATASET: datasets.update,
            contract.LIST_DATASETS: datasets.list,
            contract.GET_DATASET: datasets.get,
            contract.DELETE_DATASETS: datasets.delete,
            contract.CREATE_TRAINING: once.wrap(contract.CREATE_TRAINING, trainings.create),
            contract.GET_TRAINING: trainings.get,
            contract.LIST_TRAININGS: trainings.list,
            contract.DELETE_TRAININGS: trainings.delete,
            contract.STOP_TRAINING: trainings.stop,
            contract.REPORT_TRAINING_STARTED: trainings.started,
            contract.REPORT_TRAINING_SUCCEEDED: trainings.succeeded,
            contract.REPORT_TRAINING_FAILED: trainings.failed,
            contract.REPORT_TRAINING_STOPPED: trainings.stopped,
        }
    )
    broker, names = runtime.broker, runtime.names

    @broker.subscriber(
        names.event_queue(contract.SERVICE, "progress", contract.TrainingProgress.routing_key), names.events
    )
    async def progressed(event: contract.TrainingProgress) -> None:
        await trainings.progressed(event)
