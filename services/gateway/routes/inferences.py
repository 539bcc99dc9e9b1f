"""/inferences: create a job, start it (Async: 202 at once; Real-time: 200 once the images
exist), read it, list and delete jobs."""

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel
from starlette.responses import Response, StreamingResponse

from services.gateway.bodies import IdempotencyKey, body_doc, idempotency_key, json_body
from services.gateway.envelope import answers, respond
from services.gateway.routes.events import SSE
from services.gateway.security import require, rpc
from services.gateway.streams import resume_offset
from shared.contracts.identity import Principal
from shared.contracts.inference import (
    CANCEL_INFERENCE,
    CREATE_INFERENCE,
    DELETE_INFERENCES,
    FINISHED,
    GET_INFERENCE,
    LIST_INFERENCES,
    START_INFERENCE,
    CancelInference,
    CreatedInference,
    CreateInference,
    CreateInferenceBody,
    DeleteInferences,
    DeleteInferencesBody,
    EndpointType,
    GetInference,
    InferenceCanceled,
    InferenceFailed,
    InferencePage,
    InferenceStart,
    InferenceSucceeded,
    InferenceView,
    ListInferences,
    StartInference,
)
from shared.esd import POSITION_PATTERN, created_at

router = APIRouter(tags=["inferences"])

CAN_RUN = ("inference:all", "inference:create")


class NewInference(BaseModel):
    inference: CreatedInference


class RunningInference(BaseModel):
    inference: InferenceStart


async def _get(request: Request, principal: Principal, inference_id: str) -> InferenceView:
    return await rpc(request).call(GET_INFERENCE, GetInference(actor=principal, inference_id=inference_id))


async def _start(request: Request, principal: Principal, inference_id: str) -> Response:
    app = request.app.state
    async with app.completions.watch(inference_id) as finished:
        started = await rpc(request).call(START_INFERENCE, StartInference(actor=principal, inference_id=inference_id))
        if started.inference_type is EndpointType.ASYNC:
            return respond(202, RunningInference(inference=started.inference))

        async def done() -> bool:
            return (await _get(request, principal, inference_id)).status in FINISHED

        await app.completions.wait(
            finished, finished=done, timeout=app.settings.realtime_timeout, inference_id=inference_id
        )
    return respond(200, await _get(request, principal, inference_id))


@router.post(
    "/inferences",
    status_code=201,
    openapi_extra=body_doc(CreateInferenceBody),
    responses=answers({201: NewInference, 200: InferenceView, 202: RunningInference}, 400, 401, 413, 504, 409, 422),
)
async def create_inference(
    request: Request,
    body: CreateInferenceBody = Depends(json_body(CreateInferenceBody)),
    idempotency: IdempotencyKey = Depends(idempotency_key),
    principal: Principal = Depends(require(*CAN_RUN)),
) -> Response:
    created = await rpc(request).call(
        CREATE_INFERENCE, CreateInference(**body.model_dump(), actor=principal, **idempotency.model_dump())
    )
    if body.payload_string is not None:  # the "one API": create and start at once
        return await _start(request, principal, created.id)
    return respond(201, NewInference(inference=created))


@router.put(
    "/inferences/{inference_id}/start",
    responses=answers({202: RunningInference, 200: InferenceView}, 400, 401, 504),
)
async def start_inference(
    request: Request, inference_id: str, principal: Principal = Depends(require(*CAN_RUN))
) -> Response:
    return await _start(request, principal, inference_id)


@router.put("/inferences/{inference_id}/cancel", responses=answers({200: InferenceView}, 400, 401, 404))
async def cancel_inference(
    request: Request, inference_id: str, principal: Principal = Depends(require(*CAN_RUN))
) -> Response:
    """A queued job never runs; a running one stops at its next step. Its owner's, or anyone's
    with inference:all."""
    job = await rpc(request).call(CANCEL_INFERENCE, CancelInference(actor=principal, inference_id=inference_id))
    return respond(200, job, message="canceled")


@router.get("/inferences/{inference_id}", responses=answers({200: InferenceView}, 401, 404))
async def get_inference(
    request: Request,
    inference_id: str,
    principal: Principal = Depends(require("inference:all", "inference:list", "inference:create", key_only=True)),
) -> Response:
    return respond(200, await _get(request, principal, inference_id))


@router.get("/inferences", responses=answers({200: InferencePage}, 400, 401))
async def list_inferences(
    request: Request,
    principal: Principal = Depends(require("inference:all", "inference:list", key_only=True)),
    type: str = "txt2img",
    username: str | None = None,
    limit: int = Query(10, ge=1, le=100),
    exclusive_start_key: str | None = Query(None, pattern=POSITION_PATTERN),
) -> Response:
    command = ListInferences(
        actor=principal, task_type=type, username=username or None, limit=limit, exclusive_start_key=exclusive_start_key
    )
    return respond(200, await rpc(request).call(LIST_INFERENCES, command))


@router.delete(
    "/inferences",
    status_code=204,
    openapi_extra=body_doc(DeleteInferencesBody),
    responses=answers({204: None}, 400, 401, 413),
)
async def delete_inferences(
    request: Request,
    body: DeleteInferencesBody = Depends(json_body(DeleteInferencesBody)),
    principal: Principal = Depends(require("inference:all", key_only=True)),
) -> Response:
    await rpc(request).call(DELETE_INFERENCES, DeleteInferences(**body.model_dump(), actor=principal))
    return respond(204)


FINISHED_EVENTS = (InferenceSucceeded.routing_key, InferenceFailed.routing_key, InferenceCanceled.routing_key)


@router.get(
    "/inferences/{inference_id}/events",
    response_class=StreamingResponse,
    responses={**answers({}, 401, 404), 200: SSE},
)
async def follow_inference(
    request: Request,
    inference_id: str,
    last_event_id: str | None = Header(None),
    principal: Principal = Depends(require("inference:all", "inference:list", "inference:create")),
) -> StreamingResponse:
    """One job's events as Server-Sent Events, from its creation (or after `Last-Event-ID`) to
    its end."""
    job = await _get(request, principal, inference_id)
    start = resume_offset(last_event_id)
    since = created_at(job.createTime)
    log = request.app.state.event_log

    async def stream():
        async for event in log.read(since if start is None else start):
            if event is None:
                yield b": keep-alive\n\n"
                continue
            if not event.routing_key.startswith("inference.") or event.data().get("inference_id") != inference_id:
                continue
            yield event.sse()
            if event.routing_key in FINISHED_EVENTS:
                return

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
