"""GET /asyncapi.json and /asyncapi: the bus's events and commands (AsyncAPI 3.0), next to the
HTTP API's OpenAPI document at /api. The key alone opens them (a token too, in the token mode)."""

import html
from functools import cache

from fastapi import APIRouter, Depends, Request
from starlette.responses import HTMLResponse, JSONResponse

from services.gateway.security import key_holder
from shared.asyncapi import asyncapi_document
from shared.settings import API_VERSION

router = APIRouter(tags=["documents"], dependencies=[Depends(key_holder)])


@cache
def _document(prefix: str) -> dict:
    return asyncapi_document(API_VERSION, prefix)


@router.get("/asyncapi.json", include_in_schema=False)
async def asyncapi_json(request: Request) -> JSONResponse:
    return JSONResponse(_document(request.app.state.settings.broker_prefix))


@router.get("/asyncapi", include_in_schema=False)
async def asyncapi_page(request: Request) -> HTMLResponse:
    """A plain page of the same document (nothing fetched from elsewhere: it works offline)."""
    document = _document(request.app.state.settings.broker_prefix)
    rows = []
    for channel in document["channels"].values():
        if channel["address"] is None:
            continue
        messages = ", ".join(channel["messages"]) or "-"
        rows.append(
            f"<tr><td><code>{html.escape(channel['address'])}</code></td><td>{html.escape(messages)}</td>"
            f"<td>{html.escape(channel['description'])}</td></tr>"
        )
    body = (
        "<!doctype html><meta charset=utf-8><title>ESD bus</title>"
        "<style>body{font:14px sans-serif;margin:2em}td{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:top}</style>"
        f"<h1>{html.escape(document['info']['title'])} {html.escape(document['info']['version'])}</h1>"
        f"<p>{html.escape(document['info']['description'])} The whole document, with every message's schema: "
        "<a href=asyncapi.json>asyncapi.json</a>.</p>"
        "<table><tr><th>address</th><th>message</th><th>what</th></tr>" + "".join(rows) + "</table>"
    )
    return HTMLResponse(body)
