"""/roles: list, create (or update), delete roles."""

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.gateway.bodies import IdempotencyKey, body_doc, idempotency_key, json_body
from services.gateway.envelope import answers, respond
from services.gateway.security import check_permissions, current_principal, initial_actor, require, rpc
from shared.contracts.identity import (
    CREATE_ROLE,
    DELETE_ROLES,
    LIST_ROLES,
    CreateRole,
    CreateRoleBody,
    DeleteRoles,
    DeleteRolesBody,
    ListRoles,
    Principal,
    RoleList,
    RoleView,
)

router = APIRouter(tags=["roles"])


@router.get("/roles", responses=answers({200: RoleList}, 401))
async def list_roles(
    request: Request,
    role: str | None = None,
    principal: Principal = Depends(require("role:all", "role:list")),
) -> Response:
    return respond(200, await rpc(request).call(LIST_ROLES, ListRoles(actor=principal, role=role)))


@router.post(
    "/roles",
    status_code=201,
    openapi_extra=body_doc(CreateRoleBody),
    responses=answers({201: RoleView}, 400, 401, 413, 409, 422),
)
async def create_role(
    request: Request,
    body: CreateRoleBody = Depends(json_body(CreateRoleBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
) -> Response:
    if body.initial:
        # a client's first-run bootstrap: the key suffices (not in the token mode)
        actor = await initial_actor(request)
    else:
        actor = await current_principal(request)
        check_permissions(actor, ["role:all", "role:create"])
    role = await rpc(request).call(
        CREATE_ROLE, CreateRole(**body.model_dump(), actor=actor, **idempotency.model_dump())
    )
    return respond(201, role, message="role created")


@router.delete(
    "/roles", status_code=204, openapi_extra=body_doc(DeleteRolesBody), responses=answers({204: None}, 400, 401, 413)
)
async def delete_roles(
    request: Request,
    body: DeleteRolesBody = Depends(json_body(DeleteRolesBody)),
    principal: Principal = Depends(require("role:all", key_only=True)),
) -> Response:
    await rpc(request).call(DELETE_ROLES, DeleteRoles(**body.model_dump(), actor=principal))
    return respond(204)
