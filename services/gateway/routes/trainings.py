"""/trainings and /datasets: LoRA training on the user's own images."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import body_doc, json_body
from services.gateway.envelope import respond
from services.gateway.security import require
from shared.contracts.identity import Principal
from shared.contracts.training import (
    SERVICE,
    CreateDataset,
    CreateDatasetBody,
    CreateTraining,
    CreateTrainingBody,
    DeleteDatasets,
    DeleteDatasetsBody,
    DeleteTrainings,
    DeleteTrainingsBody,
    GetDataset,
    GetTraining,
    ListDatasets,
    ListTrainings,
    UpdateDataset,
    UpdateDatasetBody,
)

router = APIRouter(tags=["trainings"])
TRAIN = require("train:all")


def _rpc(request: Request):
    return request.app.state.rpc


@router.post("/trainings", status_code=201, openapi_extra=body_doc(CreateTrainingBody))
async def create_training(request: Request, principal: Principal = Depends(TRAIN), body: CreateTrainingBody = Depends(json_body(CreateTrainingBody))) -> Response:
    return respond(201, await _rpc(request).call(SERVICE, "create", CreateTraining(**body.model_dump(), actor=principal)))


@router.get("/trainings")
async def list_trainings(request: Request, principal: Principal = Depends(TRAIN), limit: int = Query(10, ge=1, le=100), exclusive_start_key: str | None = None) -> Response:
    command = ListTrainings(actor=principal, limit=limit, exclusive_start_key=exclusive_start_key)
    return respond(200, await _rpc(request).call(SERVICE, "list", command))


@router.get("/trainings/{training_id}")
async def get_training(request: Request, training_id: str, principal: Principal = Depends(TRAIN)) -> Response:
    return respond(200, await _rpc(request).call(SERVICE, "get", GetTraining(actor=principal, training_id=training_id)))


@router.delete("/trainings", status_code=204, openapi_extra=body_doc(DeleteTrainingsBody))
async def delete_trainings(request: Request, principal: Principal = Depends(TRAIN), body: DeleteTrainingsBody = Depends(json_body(DeleteTrainingsBody))) -> Response:
    await _rpc(request).call(SERVICE, "delete", DeleteTrainings(**body.model_dump(), actor=principal))
    return respond(204)


@router.post("/datasets", status_code=201, openapi_extra=body_doc(CreateDatasetBody))
async def create_dataset(request: Request, principal: Principal = Depends(TRAIN), body: CreateDatasetBody = Depends(json_body(CreateDatasetBody))) -> Response:
    return respond(201, await _rpc(request).call(SERVICE, "create_dataset", CreateDataset(**body.model_dump(), actor=principal)))


@router.put("/datasets/{dataset_name}", openapi_extra=body_doc(UpdateDatasetBody))
async def update_dataset(request: Request, dataset_name: str, principal: Principal = Depends(TRAIN), body: UpdateDatasetBody = Depends(json_body(UpdateDatasetBody))) -> Response:
    command = UpdateDataset(**body.model_dump(), actor=principal, dataset_name=dataset_name)
    return respond(200, await _rpc(request).call(SERVICE, "update_dataset", command))


@router.get("/datasets")
async def list_datasets(request: Request, principal: Principal = Depends(TRAIN)) -> Response:
    return respond(200, await _rpc(request).call(SERVICE, "list_datasets", ListDatasets(actor=principal)))


@router.get("/datasets/{dataset_name}")
async def get_dataset(request: Request, dataset_name: str, principal: Principal = Depends(TRAIN)) -> Response:
    return respond(200, await _rpc(request).call(SERVICE, "get_dataset", GetDataset(actor=principal, dataset_name=dataset_name)))


@router.delete("/datasets", status_code=204, openapi_extra=body_doc(DeleteDatasetsBody))
async def delete_datasets(request: Request, principal: Principal = Depends(TRAIN), body: DeleteDatasetsBody = Depends(json_body(DeleteDatasetsBody))) -> Response:
    await _rpc(request).call(SERVICE, "delete_datasets", DeleteDatasets(**body.model_dump(), actor=principal))
    return respond(204)
