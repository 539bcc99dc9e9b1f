"""GET /ping: is the API reachable and the key right."""

from fastapi import APIRouter
from starlette.responses import Response

from services.gateway.envelope import answers, respond

router = APIRouter(tags=["ping"])


@router.get("/ping", responses=answers({200: None}, routed=False))
async def ping() -> Response:
    return respond(200, message="pong")
