"""/tokens: a user's bearer tokens. `POST` trades a username and password for a token (the API
key is still needed); `DELETE` revokes the token the call presents, or (`?all=true`) every token
of its user."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import body_doc, json_body
from services.gateway.envelope import answers, respond
from services.gateway.security import current_principal, issued_token, rpc
from shared.contracts.identity import (
    ISSUE_TOKEN,
    REVOKE_TOKENS,
    CreateTokenBody,
    IssuedToken,
    IssueToken,
    Principal,
    RevokeTokens,
)
from shared.errors import Unauthorized

router = APIRouter(tags=["tokens"])


@router.post(
    "/tokens",
    status_code=201,
    openapi_extra=body_doc(CreateTokenBody),
    responses=answers({201: IssuedToken}, 400, 401, 413, 429),
)
async def create_token(request: Request, body: CreateTokenBody = Depends(json_body(CreateTokenBody))) -> Response:
    """The token is shown this once; send it as `Authorization: Bearer <token>`."""
    address = request.client.host if request.client else "unknown"
    issued = await rpc(request).call(ISSUE_TOKEN, IssueToken(**body.model_dump(), address=address))
    return respond(201, issued, message="token created")


@router.delete("/tokens", status_code=204, responses=answers({204: None}, 400, 401))
async def delete_tokens(
    request: Request,
    all: bool = Query(False, description="revoke every token of the caller's user"),
    principal: Principal = Depends(current_principal),
) -> Response:
    token = issued_token(request.headers)
    if token is None:  # a token revokes itself (or its user's): a user named otherwise cannot
        raise Unauthorized("Unauthorized: present the bearer token to revoke")
    await rpc(request).call(REVOKE_TOKENS, RevokeTokens(actor=principal, token=token, all=all))
    return respond(204)
