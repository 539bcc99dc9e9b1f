"""JSON request bodies, read and validated here rather than by FastAPI so that every bad body
(none, malformed JSON, not an object, wrong fields) gets one of ESD's phrasings. Python's
parser also takes the non-standard `Infinity`/`NaN` tokens that AUTOMATIC1111 payloads carry."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from fastapi import Header, Request
from pydantic import BaseModel, ValidationError

from services.gateway.envelope import validation_message
from shared.errors import Invalid

T = TypeVar("T", bound=BaseModel)

REF_TEMPLATE = "#/components/schemas/{model}"
# Nested models of request bodies, hoisted into the OpenAPI document's components.
BODY_DEFINITIONS: dict[str, Any] = {}


def json_body(model: type[T]) -> Callable[[Request], Any]:
    async def dependency(request: Request) -> T:
        raw = await request.body()
        data: Any = {}
        if raw.strip():
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as error:
                raise Invalid(f"request body is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise Invalid("request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            raise Invalid(validation_message(error.errors())) from None

    return dependency


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a route's JSON body."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    BODY_DEFINITIONS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class IdempotencyKey(BaseModel):
    """What a creating command carries of the `Idempotency-Key` header (shared/idempotency.py)."""

    idempotency_key: str | None = None
    request_fingerprint: str | None = None


async def idempotency_key(
    request: Request,
    key: str | None = Header(
        None,
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="A repeat with the same key and body gets the first reply and creates nothing",
    ),
) -> IdempotencyKey:
    if key is None:
        return IdempotencyKey()
    try:
        parsed = json.loads(await request.body() or b"{}")
    except ValueError:
        canonical = await request.body()
    else:
        try:
            canonical = orjson.dumps(parsed, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # what orjson cannot write (integers past 64 bits, lone surrogates)
            canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    return IdempotencyKey(idempotency_key=key, request_fingerprint=hashlib.sha256(canonical).hexdigest())
