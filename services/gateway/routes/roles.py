"""/roles: list, create (or update), delete roles."""

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.gateway.bodies import body_doc, json_body
from services.gateway.envelope import respond
from services.gateway.security import (
    check_permissions,
    current_principal,
    optional_principal,
    require,
)
from shared.contracts.identity import (
    SERVICE,
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


@router.get("/roles")
async def list_roles(
    request: Request,
    role: str | None = None,
    principal: Principal = Depends(require("role:all", "role:list")),
) -> Response:
    roles = await request.app.state.rpc.call(
        SERVICE, "list_roles", ListRoles(actor=principal, role=role), RoleList
    )
    return respond(200, roles)


@router.post("/roles", status_code=201, openapi_extra=body_doc(CreateRoleBody))
async def create_role(
    request: Request, body: CreateRoleBody = Depends(json_body(CreateRoleBody))
) -> Response:
    if body.initial:
        actor = await optional_principal(request)
    else:
        actor = await current_principal(request)
        check_permissions(actor, ["role:all", "role:create"])
    role = await request.app.state.rpc.call(
        SERVICE, "create_role", CreateRole(**body.model_dump(), actor=actor), RoleView
    )
    return respond(201, role, message="role created")


@router.delete("/roles", status_code=204, openapi_extra=body_doc(DeleteRolesBody))
async def delete_roles(
    request: Request,
    principal: Principal = Depends(require("role:all")),
    body: DeleteRolesBody = Depends(json_body(DeleteRolesBody)),
) -> Response:
    await request.app.state.rpc.call(
        SERVICE, "delete_roles", DeleteRoles(**body.model_dump(), actor=principal)
    )
    return respond(204)
