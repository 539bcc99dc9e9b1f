"""/endpoints: GPU worker pools."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import body_doc, json_body
from services.gateway.envelope import respond
from services.gateway.security import named_user, require
from shared.contracts.identity import Principal
from shared.contracts.inference import (
    SERVICE,
    CreateEndpoint,
    CreateEndpointBody,
    DeleteEndpoints,
    DeleteEndpointsBody,
    EndpointPage,
    EndpointView,
    ListEndpoints,
)

router = APIRouter(tags=["endpoints"])


@router.get("/endpoints")
async def list_endpoints(
    request: Request,
    principal: Principal = Depends(require("sagemaker_endpoint:all", "sagemaker_endpoint:list")),
    username: str | None = None,
    limit: int = Query(10, ge=1, le=1000),
    exclusive_start_key: str | None = None,
) -> Response:
    command = ListEndpoints(actor=principal, limit=limit, exclusive_start_key=exclusive_start_key)
    if username:
        command.as_roles = (await named_user(request, username)).roles
    page = await request.app.state.rpc.call(SERVICE, "list_endpoints", command, EndpointPage)
    return respond(200, page)


@router.post("/endpoints", status_code=202, openapi_extra=body_doc(CreateEndpointBody))
async def create_endpoint(
    request: Request,
    principal: Principal = Depends(require("sagemaker_endpoint:all", "sagemaker_endpoint:create")),
    body: CreateEndpointBody = Depends(json_body(CreateEndpointBody)),
) -> Response:
    endpoint = await request.app.state.rpc.call(
        SERVICE, "create_endpoint", CreateEndpoint(**body.model_dump(), actor=principal), EndpointView
    )
    return respond(202, endpoint, message=f"Endpoint deployment started: {endpoint.endpoint_name}")


@router.delete("/endpoints", status_code=204, openapi_extra=body_doc(DeleteEndpointsBody))
async def delete_endpoints(
    request: Request,
    principal: Principal = Depends(require("sagemaker_endpoint:all")),
    body: DeleteEndpointsBody = Depends(json_body(DeleteEndpointsBody)),
) -> Response:
    # stopping a pool lets running jobs finish: allow for it
    await request.app.state.rpc.call(
        SERVICE, "delete_endpoints", DeleteEndpoints(**body.model_dump(), actor=principal), timeout=120
    )
    return respond(204)
