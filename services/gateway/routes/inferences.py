"""/inferences: create a job, start it (Async: 202 at once; Real-time: 200 once the images
exist), read it, list and delete jobs."""

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.gateway.bodies import body_doc, json_body
from services.gateway.envelope import respond
from services.gateway.security import require
from shared.contracts.identity import Principal
from shared.contracts.inference import (
    SERVICE,
    CreatedInference,
    CreateInference,
    CreateInferenceBody,
    DeleteInferences,
    DeleteInferencesBody,
    EndpointType,
    GetInference,
    InferencePage,
    JobStatus,
    ListInferences,
    StartedInference,
    StartInference,
)

router = APIRouter(tags=["inferences"])

CAN_RUN = ("inference:all", "inference:create")


async def _get(request: Request, principal: Principal, inference_id: str) -> dict:
    return await request.app.state.rpc.call(
        SERVICE, "get", GetInference(actor=principal, inference_id=inference_id)
    )


async def _start(request: Request, principal: Principal, inference_id: str) -> Response:
    app = request.app.state
    async with app.completions.watch(inference_id) as finished:
        started = await app.rpc.call(
            SERVICE, "start", StartInference(actor=principal, inference_id=inference_id), StartedInference
        )
        if started.inference_type is EndpointType.ASYNC:
            return respond(202, {"inference": started.inference})

        async def done() -> bool:
            job = await _get(request, principal, inference_id)
            return job["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED)

        await app.completions.wait(finished, finished=done, timeout=app.settings.realtime_timeout, inference_id=inference_id)
    return respond(200, await _get(request, principal, inference_id))


@router.post("/inferences", status_code=201, openapi_extra=body_doc(CreateInferenceBody))
async def create_inference(
    request: Request,
    principal: Principal = Depends(require(*CAN_RUN)),
    body: CreateInferenceBody = Depends(json_body(CreateInferenceBody)),
) -> Response:
    created = await request.app.state.rpc.call(
        SERVICE, "create", CreateInference(**body.model_dump(), actor=principal), CreatedInference
    )
    if body.payload_string is not None:  # the "one API": create and start at once
        return await _start(request, principal, created.inference["id"])
    return respond(201, {"inference": created.inference})


@router.put("/inferences/{inference_id}/start")
async def start_inference(
    request: Request, inference_id: str, principal: Principal = Depends(require(*CAN_RUN))
) -> Response:
    return await _start(request, principal, inference_id)


@router.get("/inferences/{inference_id}")
async def get_inference(
    request: Request,
    inference_id: str,
    principal: Principal = Depends(require("inference:all", "inference:list", "inference:create")),
) -> Response:
    return respond(200, await _get(request, principal, inference_id))


@router.get("/inferences")
async def list_inferences(
    request: Request,
    principal: Principal = Depends(require("inference:all", "inference:list")),
    type: str = "txt2img",
    username: str | None = None,
    limit: int = Query(10, ge=1, le=100),
    exclusive_start_key: str | None = None,
) -> Response:
    command = ListInferences(
        actor=principal, task_type=type, username=username, limit=limit, exclusive_start_key=exclusive_start_key
    )
    page = await request.app.state.rpc.call(SERVICE, "list", command, InferencePage)
    return respond(200, page)


@router.delete("/inferences", status_code=204, openapi_extra=body_doc(DeleteInferencesBody))
async def delete_inferences(
    request: Request,
    principal: Principal = Depends(require("inference:all")),
    body: DeleteInferencesBody = Depends(json_body(DeleteInferencesBody)),
) -> Response:
    await request.app.state.rpc.call(
        SERVICE, "delete", DeleteInferences(**body.model_dump(), actor=principal)
    )
    return respond(204)
