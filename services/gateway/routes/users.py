"""/users: list, create (or update), delete users."""

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
    CreateUser,
    CreateUserBody,
    DeleteUsers,
    DeleteUsersBody,
    ListUsers,
    Principal,
    UserList,
)

router = APIRouter(tags=["users"])


@router.get("/users")
async def list_users(
    request: Request,
    username: str | None = None,
    principal: Principal = Depends(current_principal),
) -> Response:
    # Without user:list a caller still gets an answer: itself (identity decides).
    users = await request.app.state.rpc.call(
        SERVICE, "list_users", ListUsers(actor=principal, username=username), UserList
    )
    return respond(200, users)


@router.post("/users", status_code=201, openapi_extra=body_doc(CreateUserBody))
async def create_user(
    request: Request, body: CreateUserBody = Depends(json_body(CreateUserBody))
) -> Response:
    if body.initial:
        # a client's first-run bootstrap: the key suffices
        actor = await optional_principal(request)
    else:
        actor = await current_principal(request)
        check_permissions(actor, ["user:all", "user:create"])
    command = CreateUser(**body.model_dump(), actor=actor)
    await request.app.state.rpc.call(SERVICE, "create_user", command)
    return respond(201)


@router.delete("/users", status_code=204, openapi_extra=body_doc(DeleteUsersBody))
async def delete_users(
    request: Request,
    principal: Principal = Depends(require("user:all")),
    body: DeleteUsersBody = Depends(json_body(DeleteUsersBody)),
) -> Response:
    await request.app.state.rpc.call(
        SERVICE, "delete_users", DeleteUsers(**body.model_dump(), actor=principal)
    )
    return respond(204)
