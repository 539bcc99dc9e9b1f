"""/checkpoints: upload (multipart or by URL), activate, rename, disable, list, delete."""

import re
from enum import StrEnum

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.responses import Response

from services.gateway.bodies import IdempotencyKey, body_doc, idempotency_key, json_body
from services.gateway.envelope import Optional, answers, respond
from services.gateway.security import named_user, require, rpc
from shared.contracts.checkpoint import (
    CREATE_CHECKPOINT,
    DELETE_CHECKPOINTS,
    GET_CHECKPOINT,
    LIST_CHECKPOINTS,
    UPDATE_CHECKPOINT,
    CheckpointItem,
    CheckpointPage,
    CheckpointStatus,
    CheckpointType,
    CheckpointView,
    CreateCheckpoint,
    CreateCheckpointBody,
    DeleteCheckpoints,
    DeleteCheckpointsBody,
    GetCheckpoint,
    ListCheckpoints,
    UpdateCheckpoint,
    UpdateCheckpointBody,
)
from shared.contracts.identity import Principal

router = APIRouter(tags=["checkpoints"])


class OneCheckpoint(BaseModel):
    checkpoint: CheckpointItem


class UploadStarted(BaseModel):
    checkpoint: CheckpointView
    s3PresignUrl: dict[str, list[str]]  # file name -> one PUT URL per part


class DownloadsStarted(BaseModel):
    checkpoints: list[CheckpointView]


class CheckpointUpdated(BaseModel):
    checkpoint: CheckpointView | None = None


def _names(values: type[StrEnum]) -> dict:
    """A query list of these values, repeated (`?types=a&types=b`) or comma-separated (`?types=a,b`),
    as the document states it."""
    one = "|".join(re.escape(value.value) for value in values)
    return {"items": {"type": "string", "pattern": f"^({one})(,({one}))*$"}}


def _split(values: list[str]) -> list[str]:
    """Repeated (`?types=a&types=b`) and comma-separated (`?types=a,b`) both work."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@router.get("/checkpoints", responses=answers({200: CheckpointPage}, 400, 401))
async def list_checkpoints(
    request: Request,
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:list")),
    page: int = Query(1, ge=1),
    per_page: int = Query(10, ge=1, le=1000),
    types: list[str] = Query([], json_schema_extra=_names(CheckpointType)),
    status: list[str] = Query([], json_schema_extra=_names(CheckpointStatus)),
    username: str | None = None,
) -> Response:
    command = ListCheckpoints(actor=principal, page=page, per_page=per_page, types=_split(types), status=_split(status))
    if username:
        command.subject = await named_user(request, username)
    return respond(200, await rpc(request).call(LIST_CHECKPOINTS, command))


@router.get("/checkpoints/{checkpoint_id}", responses=answers({200: OneCheckpoint}, 401, 404))
async def get_checkpoint(
    request: Request,
    checkpoint_id: str,
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:list")),
) -> Response:
    item = await rpc(request).call(GET_CHECKPOINT, GetCheckpoint(actor=principal, checkpoint_id=checkpoint_id))
    return respond(200, OneCheckpoint(checkpoint=item))


@router.post(
    "/checkpoints",
    status_code=201,
    openapi_extra=body_doc(CreateCheckpointBody),
    responses=answers({201: UploadStarted, 202: DownloadsStarted}, 400, 401, 413, 409, 422),
)
async def create_checkpoint(
    request: Request,
    body: CreateCheckpointBody = Depends(json_body(CreateCheckpointBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:create")),
) -> Response:
    created = await rpc(request).call(
        CREATE_CHECKPOINT, CreateCheckpoint(**body.model_dump(), actor=principal, **idempotency.model_dump())
    )
    if body.urls is not None:
        return respond(
            202,
            DownloadsStarted(checkpoints=created.checkpoints or []),
            message="Checkpoint creation in progress, please check later",
        )
    return respond(201, UploadStarted(checkpoint=created.checkpoint, s3PresignUrl=created.s3PresignUrl or {}))


@router.put(
    "/checkpoints/{checkpoint_id}",
    openapi_extra=body_doc(UpdateCheckpointBody),
    responses=answers({200: Optional(CheckpointUpdated), 202: None}, 400, 401, 404, 413),
)
async def update_checkpoint(
    request: Request,
    checkpoint_id: str,
    body: UpdateCheckpointBody = Depends(json_body(UpdateCheckpointBody)),
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:create", key_only=True)),
) -> Response:
    command = UpdateCheckpoint(**body.model_dump(), actor=principal, checkpoint_id=checkpoint_id)
    updated = await rpc(request).call(UPDATE_CHECKPOINT, command)
    data = CheckpointUpdated(checkpoint=updated.checkpoint) if updated.checkpoint else None
    return respond(updated.status, data, message=updated.message)


@router.delete(
    "/checkpoints",
    status_code=204,
    openapi_extra=body_doc(DeleteCheckpointsBody),
    responses=answers({204: None}, 400, 401, 413),
)
async def delete_checkpoints(
    request: Request,
    body: DeleteCheckpointsBody = Depends(json_body(DeleteCheckpointsBody)),
    principal: Principal = Depends(require("checkpoint:all", key_only=True)),
) -> Response:
    await rpc(request).call(DELETE_CHECKPOINTS, DeleteCheckpoints(**body.model_dump(), actor=principal))
    return respond(204)
