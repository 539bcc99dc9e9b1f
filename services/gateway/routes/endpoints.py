"""/endpoints: GPU worker pools."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import IdempotencyKey, body_doc, idempotency_key, json_body
from services.gateway.envelope import answers, respond
from services.gateway.security import named_user, require, rpc
from shared.contracts.identity import Principal
from shared.contracts.inference import (
    CREATE_ENDPOINT,
    DELETE_ENDPOINTS,
    LIST_ENDPOINTS,
    CreateEndpoint,
    CreateEndpointBody,
    DeleteEndpoints,
    DeleteEndpointsBody,
    EndpointPage,
    EndpointView,
    ListEndpoints,
)
from shared.esd import POSITION_PATTERN

router = APIRouter(tags=["endpoints"])


@router.get("/endpoints", responses=answers({200: EndpointPage}, 400, 401))
async def list_endpoints(
    request: Request,
    principal: Principal = Depends(require("sagemaker_endpoint:all", "sagemaker_endpoint:list")),
    username: str | None = None,
    limit: int = Query(10, ge=1, le=1000),
    exclusive_start_key: str | None = Query(None, pattern=POSITION_PATTERN),
) -> Response:
    command = ListEndpoints(actor=principal, limit=limit, exclusive_start_key=exclusive_start_key)
    if username:
        command.subject = await named_user(request, username)
    return respond(200, await rpc(request).call(LIST_ENDPOINTS, command))


@router.post(
    "/endpoints",
    status_code=202,
    openapi_extra=body_doc(CreateEndpointBody),
    responses=answers({202: EndpointView}, 400, 401, 413, 409, 422),
)
async def create_endpoint(
    request: Request,
    body: CreateEndpointBody = Depends(json_body(CreateEndpointBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
    principal: Principal = Depends(require("sagemaker_endpoint:all", "sagemaker_endpoint:create")),
) -> Response:
    endpoint = await rpc(request).call(
        CREATE_ENDPOINT, CreateEndpoint(**body.model_dump(), actor=principal, **idempotency.model_dump())
    )
    return respond(202, endpoint, message=f"Endpoint deployment started: {endpoint.endpoint_name}")


@router.delete(
    "/endpoints",
    status_code=204,
    openapi_extra=body_doc(DeleteEndpointsBody),
    responses=answers({204: None}, 400, 401, 413),
)
async def delete_endpoints(
    request: Request,
    body: DeleteEndpointsBody = Depends(json_body(DeleteEndpointsBody)),
    principal: Principal = Depends(require("sagemaker_endpoint:all", key_only=True)),
) -> Response:
    # stopping a pool lets running jobs finish: allow for it
    await rpc(request).call(DELETE_ENDPOINTS, DeleteEndpoints(**body.model_dump(), actor=principal), timeout=120)
    return respond(204)
