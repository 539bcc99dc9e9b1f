"""GET /events: every event the caller may see, as Server-Sent Events (see gateway/streams.py)."""

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import StreamingResponse

from services.gateway.envelope import answers
from services.gateway.security import current_principal
from services.gateway.streams import may_see, resume_offset, wanted
from shared.contracts.identity import Principal

router = APIRouter(tags=["events"])

SSE = {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "Server-Sent Events"}
TYPES = Query(
    None, description="shell-style patterns of event types, comma-separated (`inference.*,training.completed`)"
)


@router.get("/events", response_class=StreamingResponse, responses={**answers({}, 401), 200: SSE})
async def follow_events(
    request: Request,
    type: str | None = TYPES,
    last_event_id: str | None = Header(None),
    principal: Principal = Depends(current_principal),
) -> StreamingResponse:
    patterns = [pattern.strip() for pattern in (type or "").split(",") if pattern.strip()]
    start = resume_offset(last_event_id)
    log = request.app.state.event_log

    async def stream():
        async for event in log.read("next" if start is None else start):
            if event is None:
                yield b": keep-alive\n\n"
            elif wanted(event.routing_key, patterns) and may_see(principal, event.routing_key, event.data()):
                yield event.sse()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"cache-control": "no-cache"})
