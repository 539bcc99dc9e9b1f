"""/checkpoints: upload (multipart or by URL), activate, rename, disable, list, delete."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import body_doc, json_body
from services.gateway.envelope import respond
from services.gateway.security import named_user, require
from shared.contracts.checkpoint import (
    SERVICE,
    CheckpointItem,
    CheckpointPage,
    CreateCheckpoint,
    CreateCheckpointBody,
    CreatedCheckpoint,
    DeleteCheckpoints,
    DeleteCheckpointsBody,
    GetCheckpoint,
    ListCheckpoints,
    UpdateCheckpoint,
    UpdateCheckpointBody,
    UpdatedCheckpoint,
)
from shared.contracts.identity import Principal

router = APIRouter(tags=["checkpoints"])


def _split(values: list[str]) -> list[str]:
    """Repeated (`?types=a&types=b`) and comma-separated (`?types=a,b`) both work."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@router.get("/checkpoints")
async def list_checkpoints(
    request: Request,
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:list")),
    page: int = Query(1, ge=1),
    per_page: int = Query(10, ge=1, le=1000),
    types: list[str] = Query([]),
    status: list[str] = Query([]),
    username: str | None = None,
) -> Response:
    command = ListCheckpoints(
        actor=principal,
        page=page,
        per_page=per_page,
        types=_split(types),
        status=_split(status),
    )
    if username:
        subject = await named_user(request, username)
        command.as_roles, command.as_username = subject.roles, subject.username
    result = await request.app.state.rpc.call(SERVICE, "list", command, CheckpointPage)
    return respond(200, result)


@router.get("/checkpoints/{checkpoint_id}")
async def get_checkpoint(
    request: Request,
    checkpoint_id: str,
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:list")),
) -> Response:
    item = await request.app.state.rpc.call(
        SERVICE, "get", GetCheckpoint(actor=principal, checkpoint_id=checkpoint_id), CheckpointItem
    )
    return respond(200, {"checkpoint": item.model_dump(mode="json")})


@router.post("/checkpoints", status_code=201, openapi_extra=body_doc(CreateCheckpointBody))
async def create_checkpoint(
    request: Request,
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:create")),
    body: CreateCheckpointBody = Depends(json_body(CreateCheckpointBody)),
) -> Response:
    created = await request.app.state.rpc.call(
        SERVICE, "create", CreateCheckpoint(**body.model_dump(), actor=principal), CreatedCheckpoint
    )
    if body.urls is not None:
        return respond(
            202,
            created.model_dump(mode="json", include={"checkpoints"}),
            message="Checkpoint creation in progress, please check later",
        )
    return respond(201, created.model_dump(mode="json", include={"checkpoint", "s3PresignUrl"}))


@router.put("/checkpoints/{checkpoint_id}", openapi_extra=body_doc(UpdateCheckpointBody))
async def update_checkpoint(
    request: Request,
    checkpoint_id: str,
    principal: Principal = Depends(require("checkpoint:all", "checkpoint:create")),
    body: UpdateCheckpointBody = Depends(json_body(UpdateCheckpointBody)),
) -> Response:
    command = UpdateCheckpoint(**body.model_dump(), actor=principal, checkpoint_id=checkpoint_id)
    updated = await request.app.state.rpc.call(SERVICE, "update", command, UpdatedCheckpoint)
    data = {"checkpoint": updated.checkpoint.model_dump(mode="json")} if updated.checkpoint else None
    return respond(updated.status, data, message=updated.message)


@router.delete("/checkpoints", status_code=204, openapi_extra=body_doc(DeleteCheckpointsBody))
async def delete_checkpoints(
    request: Request,
    principal: Principal = Depends(require("checkpoint:all")),
    body: DeleteCheckpointsBody = Depends(json_body(DeleteCheckpointsBody)),
) -> Response:
    await request.app.state.rpc.call(
        SERVICE, "delete", DeleteCheckpoints(**body.model_dump(), actor=principal)
    )
    return respond(204)

