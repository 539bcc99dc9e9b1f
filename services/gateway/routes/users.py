"""/users: list, create (or update), delete users."""

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.gateway.bodies import IdempotencyKey, body_doc, idempotency_key, json_body
from services.gateway.envelope import answers, respond
from services.gateway.security import check_permissions, current_principal, initial_actor, require, rpc
from shared.contracts.identity import (
    CREATE_USER,
    DELETE_USERS,
    LIST_USERS,
    CreateUser,
    CreateUserBody,
    DeleteUsers,
    DeleteUsersBody,
    ListUsers,
    Principal,
    UserList,
)

router = APIRouter(tags=["users"])


@router.get("/users", responses=answers({200: UserList}, 401))
async def list_users(
    request: Request,
    username: str | None = None,
    principal: Principal = Depends(current_principal),
) -> Response:
    # Without user:list a caller still gets an answer: itself (identity decides).
    users = await rpc(request).call(LIST_USERS, ListUsers(actor=principal, username=username))
    return respond(200, users)


@router.post(
    "/users",
    status_code=201,
    openapi_extra=body_doc(CreateUserBody),
    responses=answers({201: None}, 400, 401, 413, 409, 422),
)
async def create_user(
    request: Request,
    body: CreateUserBody = Depends(json_body(CreateUserBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
) -> Response:
    if body.initial:
        # a client's first-run bootstrap: the key suffices (not in the token mode)
        actor = await initial_actor(request)
    else:
        actor = await current_principal(request)
        check_permissions(actor, ["user:all", "user:create"])
    await rpc(request).call(CREATE_USER, CreateUser(**body.model_dump(), actor=actor, **idempotency.model_dump()))
    return respond(201)


@router.delete(
    "/users", status_code=204, openapi_extra=body_doc(DeleteUsersBody), responses=answers({204: None}, 400, 401, 413)
)
async def delete_users(
    request: Request,
    body: DeleteUsersBody = Depends(json_body(DeleteUsersBody)),
    principal: Principal = Depends(require("user:all")),
) -> Response:
    await rpc(request).call(DELETE_USERS, DeleteUsers(**body.model_dump(), actor=principal))
    return respond(204)
