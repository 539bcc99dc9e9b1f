"""/trainings and /datasets: LoRA training on the user's own images."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import IdempotencyKey, body_doc, idempotency_key, json_body
from services.gateway.envelope import answers, respond
from services.gateway.security import require, rpc
from shared.contracts.identity import Principal
from shared.contracts.training import (
    CREATE_DATASET,
    CREATE_TRAINING,
    DELETE_DATASETS,
    DELETE_TRAININGS,
    GET_DATASET,
    GET_TRAINING,
    LIST_DATASETS,
    LIST_TRAININGS,
    STOP_TRAINING,
    UPDATE_DATASET,
    CreateDataset,
    CreateDatasetBody,
    CreatedDataset,
    CreatedTraining,
    CreateTraining,
    CreateTrainingBody,
    DatasetList,
    DatasetView,
    DeleteDatasets,
    DeleteDatasetsBody,
    DeleteTrainings,
    DeleteTrainingsBody,
    GetDataset,
    GetTraining,
    ListDatasets,
    ListTrainings,
    StopTraining,
    TrainingPage,
    TrainingView,
    UpdateDataset,
    UpdateDatasetBody,
    UpdatedDataset,
)
from shared.esd import POSITION_PATTERN

router = APIRouter(tags=["trainings"])
TRAIN = require("train:all")


@router.post(
    "/trainings",
    status_code=201,
    openapi_extra=body_doc(CreateTrainingBody),
    responses=answers({201: CreatedTraining}, 400, 401, 413, 409, 422),
)
async def create_training(
    request: Request,
    body: CreateTrainingBody = Depends(json_body(CreateTrainingBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
    principal: Principal = Depends(TRAIN),
) -> Response:
    created = await rpc(request).call(
        CREATE_TRAINING, CreateTraining(**body.model_dump(), actor=principal, **idempotency.model_dump())
    )
    return respond(201, created)


@router.get("/trainings", responses=answers({200: TrainingPage}, 400, 401))
async def list_trainings(
    request: Request,
    principal: Principal = Depends(TRAIN),
    limit: int = Query(10, ge=1, le=100),
    exclusive_start_key: str | None = Query(None, pattern=POSITION_PATTERN),
) -> Response:
    command = ListTrainings(actor=principal, limit=limit, exclusive_start_key=exclusive_start_key)
    return respond(200, await rpc(request).call(LIST_TRAININGS, command))


@router.get("/trainings/{training_id}", responses=answers({200: TrainingView}, 401, 404))
async def get_training(request: Request, training_id: str, principal: Principal = Depends(TRAIN)) -> Response:
    return respond(200, await rpc(request).call(GET_TRAINING, GetTraining(actor=principal, training_id=training_id)))


@router.put("/trainings/{training_id}/stop", responses=answers({200: TrainingView}, 400, 401, 404))
async def stop_training(request: Request, training_id: str, principal: Principal = Depends(TRAIN)) -> Response:
    """A queued training never runs; a running one stops at its next step, and the epochs it
    saved become Lora checkpoints (`saved_checkpoint_ids`, once `job_status` is Stopped)."""
    training = await rpc(request).call(STOP_TRAINING, StopTraining(actor=principal, training_id=training_id))
    return respond(200, training, message="stop requested" if training.stop_requested else "stopped")


@router.delete(
    "/trainings",
    status_code=204,
    openapi_extra=body_doc(DeleteTrainingsBody),
    responses=answers({204: None}, 400, 401, 413),
)
async def delete_trainings(
    request: Request,
    body: DeleteTrainingsBody = Depends(json_body(DeleteTrainingsBody)),
    principal: Principal = Depends(TRAIN),
) -> Response:
    await rpc(request).call(DELETE_TRAININGS, DeleteTrainings(**body.model_dump(), actor=principal))
    return respond(204)


@router.post(
    "/datasets",
    status_code=201,
    openapi_extra=body_doc(CreateDatasetBody),
    responses=answers({201: CreatedDataset}, 400, 401, 413, 409, 422),
)
async def create_dataset(
    request: Request,
    body: CreateDatasetBody = Depends(json_body(CreateDatasetBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
    principal: Principal = Depends(TRAIN),
) -> Response:
    return respond(
        201,
        await rpc(request).call(
            CREATE_DATASET, CreateDataset(**body.model_dump(), actor=principal, **idempotency.model_dump())
        ),
    )


@router.put(
    "/datasets/{dataset_name}",
    openapi_extra=body_doc(UpdateDatasetBody),
    responses=answers({200: UpdatedDataset}, 400, 401, 404, 413),
)
async def update_dataset(
    request: Request,
    dataset_name: str,
    body: UpdateDatasetBody = Depends(json_body(UpdateDatasetBody)),
    principal: Principal = Depends(TRAIN),
) -> Response:
    command = UpdateDataset(**body.model_dump(), actor=principal, dataset_name=dataset_name)
    return respond(200, await rpc(request).call(UPDATE_DATASET, command))


@router.get("/datasets", responses=answers({200: DatasetList}, 401))
async def list_datasets(request: Request, principal: Principal = Depends(TRAIN)) -> Response:
    return respond(200, await rpc(request).call(LIST_DATASETS, ListDatasets(actor=principal)))


@router.get("/datasets/{dataset_name}", responses=answers({200: DatasetView}, 401, 404))
async def get_dataset(request: Request, dataset_name: str, principal: Principal = Depends(TRAIN)) -> Response:
    return respond(200, await rpc(request).call(GET_DATASET, GetDataset(actor=principal, dataset_name=dataset_name)))


@router.delete(
    "/datasets",
    status_code=204,
    openapi_extra=body_doc(DeleteDatasetsBody),
    responses=answers({204: None}, 400, 401, 413),
)
async def delete_datasets(
    request: Request,
    body: DeleteDatasetsBody = Depends(json_body(DeleteDatasetsBody)),
    principal: Principal = Depends(require("train:all", key_only=True)),
) -> Response:
    await rpc(request).call(DELETE_DATASETS, DeleteDatasets(**body.model_dump(), actor=principal))
    return respond(204)
