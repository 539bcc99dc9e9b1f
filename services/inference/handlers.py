"""Where the inference service's messages enter: endpoint and job commands from the gateway,
the workers' reports and heartbeats, job progress, and the checkpoint events that keep the
catalog. Each is handed to the use case that answers it."""

from __future__ import annotations

from faststream.rabbit import RabbitMessage

from services.inference.catalog import Catalog
from services.inference.endpoints import Endpoints
from services.inference.jobs import Jobs
from shared.contracts import checkpoint as checkpoints
from shared.contracts import inference as contract
from shared.contracts.workers import WorkerHeartbeat
from shared.idempotency import Idempotency
from shared.service import Runtime

# checkpoint events -> whether the checkpoint is usable afterwards
_CATALOG_EVENTS = {
    checkpoints.CheckpointActivated.routing_key: (checkpoints.CheckpointActivated, True),
    checkpoints.CheckpointRenamed.routing_key: (checkpoints.CheckpointRenamed, True),
    checkpoints.CheckpointDisabled.routing_key: (checkpoints.CheckpointDisabled, False),
    checkpoints.CheckpointDeleted.routing_key: (checkpoints.CheckpointDeleted, False),
}


def register(runtime: Runtime, endpoints: Endpoints, jobs: Jobs, catalog: Catalog, once: Idempotency) -> None:
    runtime.rpc.register_all(
        {
            contract.CREATE_ENDPOINT: once.wrap(contract.CREATE_ENDPOINT, endpoints.create),
            contract.LIST_ENDPOINTS: endpoints.list,
            contract.DELETE_ENDPOINTS: endpoints.delete,
            contract.CREATE_INFERENCE: once.wrap(contract.CREATE_INFERENCE, jobs.create),
            contract.START_INFERENCE: jobs.start,
            contract.GET_INFERENCE: jobs.get,
            contract.LIST_INFERENCES: jobs.list,
            contract.DELETE_INFERENCES: jobs.delete,
            contract.CANCEL_INFERENCE: jobs.cancel,
            contract.REPORT_INFERENCE_STARTED: jobs.started,
            contract.REPORT_INFERENCE_SUCCEEDED: jobs.succeeded,
            contract.REPORT_INFERENCE_FAILED: jobs.failed,
        }
    )
    broker, names = runtime.broker, runtime.names

    @broker.subscriber(names.heartbeat_queue(contract.HEARTBEATS))
    async def heartbeat(beat: WorkerHeartbeat) -> None:
        await endpoints.heartbeat(beat)

    @broker.subscriber(
        names.event_queue(contract.SERVICE, "progress", contract.InferenceProgress.routing_key), names.events
    )
    async def progressed(event: contract.InferenceProgress) -> None:
        await jobs.progressed(event)

    # One queue for every checkpoint event, so that they are applied in the order they happened.
    @broker.subscriber(names.event_queue(contract.SERVICE, "checkpoints", "checkpoint.*"), names.events)
    async def checkpoint_changed(body: dict, message: RabbitMessage) -> None:
        known = _CATALOG_EVENTS.get(message.raw_message.routing_key or "")
        if known is None:
            return  # checkpoint.failed: nothing was usable
        model, usable = known
        event = model.model_validate(body)
        await (catalog.usable(event) if usable else catalog.unusable(event))
