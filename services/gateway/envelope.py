"""The ESD envelope, and the one place where errors become HTTP responses.

Body: `{"statusCode": N, "data": {...}, "message": "..."}` with HTTP status == statusCode; `data`
omitted when empty, `message` defaulting to the reason phrase; 204 has an empty body. Validation
errors are phrased as ESD's clients match them (`object has missing required properties
(["field"])`, `required minimum: 1`)."""

from __future__ import annotations

import json
from functools import cache
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from shared.errors import EsdError, outage

log = structlog.get_logger(__name__)


class EsdResponse(Response):
    media_type = "application/json"


def respond(status: int = 200, data: Any = None, message: str | None = None) -> Response:
    if status == 204:
        return Response(status_code=204)
    message = message if message is not None else HTTPStatus(status).phrase
    if isinstance(data, BaseModel):
        # the model serializes itself straight to JSON (no dict in between): the hot path
        body = b'{"statusCode":%d,"data":%b,"message":%b}' % (
            status,
            data.__pydantic_serializer__.to_json(data),
            orjson.dumps(message),
        )
        return EsdResponse(body, status_code=status)
    envelope: dict[str, Any] = {"statusCode": status}
    if data:
        envelope["data"] = data
    envelope["message"] = message
    return EsdResponse(orjson.dumps(envelope), status_code=status)


FORBIDDEN_BODY = b'{"message":"Forbidden"}'


def forbidden_api_key() -> Response:
    # API Gateway's exact answer to a missing or wrong key: ESD clients match this body.
    return EsdResponse(FORBIDDEN_BODY, status_code=403)


# --- what the OpenAPI document says of replies ----------------------------------------------


class ErrorReply(BaseModel):
    """Every error but a bad API key: the envelope with a readable message."""

    statusCode: int
    message: str


class ForbiddenReply(BaseModel):
    """A missing or wrong API key (API Gateway's exact body)."""

    message: str


class Optional:
    """A reply whose `data` is there only sometimes (`answers({200: Optional(Model)})`)."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model


@cache
def envelope_of(model: type[BaseModel] | None, required: bool = True) -> type[BaseModel]:
    """The envelope around a reply's `data`, for the document: `{statusCode, data, message}`."""
    if model is None:
        return create_model("Reply", statusCode=(int, ...), message=(str, ...))
    if not required:
        return create_model(
            f"{model.__name__}MaybeReply", statusCode=(int, ...), data=(model | None, None), message=(str, ...)
        )
    return create_model(f"{model.__name__}Reply", statusCode=(int, ...), data=(model, ...), message=(str, ...))


_WHY = {
    400: "Bad request: a body or query that breaks the contract, or a rule the request breaks",
    401: "No user, or a user that does not exist (token mode: no valid bearer token)",
    403: 'Missing or wrong API key (body `{"message": "Forbidden"}`), or a missing permission',
    404: "Not found",
    409: "A request with the same Idempotency-Key is still being handled",
    422: "The Idempotency-Key was used for another request",
    413: "Request body too large",
    429: "Too many failed sign-ins for this user or address; the message says when to retry",
    503: "A service did not answer in time; retry",
    504: "The job did not finish in time; it goes on",
}


def answers(
    success: dict[int, type[BaseModel] | Optional | None], *errors: int, routed: bool = True
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: its success replies (status -> data model) and the error
    statuses it really answers. Every route answers 403 (the API key) besides, and a routed
    one 503 (a service away)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status, model in success.items():
        if status == 204:
            documented[204] = {"description": "No Content"}
        elif isinstance(model, Optional):
            documented[status] = {"model": envelope_of(model.model, False), "description": HTTPStatus(status).phrase}
        else:
            documented[status] = {"model": envelope_of(model), "description": HTTPStatus(status).phrase}
    for status in sorted({*errors, *((503,) if routed else ())}):
        documented[status] = {"model": ErrorReply, "description": _WHY[status]}
    # the key's 403 has API Gateway's own body; a missing permission has the envelope
    documented[403] = {
        "description": _WHY[403],
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/ForbiddenReply"},
                        {"$ref": "#/components/schemas/ErrorReply"},
                    ]
                }
            }
        },
    }
    return documented


# --- validation messages -----------------------------------------------------------------


def _field(loc: tuple | list) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    return ".".join(parts)


def _describe(error: dict) -> str:
    kind = error["type"]
    field = _field(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    value = error.get("input")
    prefix = f"{field}: " if field else ""
    if kind == "string_too_short":
        return (
            f'{prefix}string "{value}" is too short (length: {len(value)}, required minimum: {ctx.get("min_length")})'
        )
    if kind == "too_short":
        return (
            f"{prefix}array is too short "
            f"(length: {ctx.get('actual_length')}, required minimum: {ctx.get('min_length')})"
        )
    if kind == "string_too_long":
        return f"{prefix}string is too long (length: {len(value)}, maximum allowed: {ctx.get('max_length')})"
    if kind == "too_long":
        return (
            f"{prefix}array is too long (length: {ctx.get('actual_length')}, maximum allowed: {ctx.get('max_length')})"
        )
    if kind in ("model_type", "model_attributes_type", "dict_type") and not field:
        return "request body must be a JSON object"
    # pydantic prefixes the messages of our validators with "Value error, "
    return f"{prefix}{error.get('msg', 'invalid value').removeprefix('Value error, ')}"


def validation_message(errors: list[dict]) -> str:
    missing = sorted({_field(e["loc"]) for e in errors if e["type"] == "missing" and _field(e["loc"])})
    if missing:
        return f"object has missing required properties ({json.dumps(missing, separators=(',', ':'))})"
    if not errors:
        return "invalid request"
    return "; ".join(dict.fromkeys(_describe(error) for error in errors[:5]))


# --- exception handlers --------------------------------------------------------------------


async def _esd_error(_: Request, error: EsdError) -> Response:
    if error.status >= 500:
        log.warning("request.failed", status=error.status, error=error.message)
    return respond(error.status, message=error.message)


async def _request_validation(_: Request, error: RequestValidationError) -> Response:
    return respond(400, message=validation_message(list(error.errors())))


async def _pydantic_validation(_: Request, error: ValidationError) -> Response:
    return respond(400, message=validation_message(error.errors()))


async def _http_error(_: Request, error: StarletteHTTPException) -> Response:
    message = error.detail if isinstance(error.detail, str) else None
    return respond(error.status_code, message=message)


async def _unexpected(request: Request, error: Exception) -> Response:
    if (away := outage(error)) is not None:  # the broker is away: a 503 saying so, not a crash
        return await _esd_error(request, away)
    log.exception("request.crashed", method=request.method, path=request.url.path)
    return respond(500, message="Internal Server Error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EsdError, _esd_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _pydantic_validation)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
