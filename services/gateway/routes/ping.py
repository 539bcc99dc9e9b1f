"""GET /ping: is the API reachable and the key right."""

from fastapi import APIRouter
from starlette.responses import Response

from services.gateway.envelope import respond

router = APIRouter(tags=["ping"])


@router.get("/ping")
async def ping() -> Response:
    return respond(200, message="pong")
