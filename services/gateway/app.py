"""The gateway's FastAPI application: the ESD routes at `/<route>` and `/prod/<route>`, the
OpenAPI document at `/api`, and a broker connection for RPC and identity's events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from faststream.rabbit import RabbitQueue

from services.gateway.bodies import BODY_DEFINITIONS
from services.gateway.completions import Completions
from services.gateway.envelope import ErrorReply, ForbiddenReply, install_error_handlers
from services.gateway.metrics import RequestMetrics
from services.gateway.routes import (
    asyncapi,
    checkpoints,
    endpoints,
    events,
    inferences,
    ping,
    roles,
    tokens,
    trainings,
    users,
)
from services.gateway.routes.console import ConsoleFiles
from services.gateway.security import EdgeMiddleware, Principals
from services.gateway.streams import EventLog
from shared.contracts.inference import InferenceCanceled, InferenceFailed, InferenceSucceeded
from shared.messaging import Event, Names, create_broker
from shared.rpc import RpcClient
from shared.settings import API_VERSION, Settings

log = structlog.get_logger(__name__)

ROUTERS = (
    ping.router,
    users.router,
    roles.router,
    tokens.router,
    checkpoints.router,
    endpoints.router,
    inferences.router,
    trainings.router,
    events.router,
    asyncapi.router,
)


def create_app(settings: Settings) -> FastAPI:
    api_key = settings.api_key.get_secret_value()
    if not api_key:
        raise SystemExit("ESD_API_KEY must be set: it is the credential every client sends")
    names = Names(settings.broker_prefix)
    broker = create_broker(settings)
    rpc = RpcClient(settings.amqp_url, names.prefix, settings.rpc_timeout)
    event_log = EventLog(settings.amqp_url, names)
    principals = Principals(rpc)

    completions = Completions()

    def replica_queue(routing_key: str) -> RabbitQueue:
        return names.replica_queue("gateway", routing_key)

    # Real-time callers wait for their job: each replica hears every job that finishes.
    @broker.subscriber(replica_queue(InferenceSucceeded.routing_key), names.events)
    async def on_job_succeeded(event: InferenceSucceeded) -> None:
        completions.finished(event.inference_id)

    @broker.subscriber(replica_queue(InferenceFailed.routing_key), names.events)
    async def on_job_failed(event: InferenceFailed) -> None:
        completions.finished(event.inference_id)

    @broker.subscriber(replica_queue(InferenceCanceled.routing_key), names.events)
    async def on_job_canceled(event: InferenceCanceled) -> None:
        completions.finished(event.inference_id)

    # Each gateway replica drops its cached principals when any user, role or token changes
    # (what changed does not matter: every cached principal may hold the role), so a revoked
    # token is refused at once.
    for routing_key in ("user.*", "role.*", "token.*"):

        @broker.subscriber(replica_queue(routing_key), names.events)
        async def on_identity_change(_: Event) -> None:
            principals.invalidate()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.start()
        await rpc.start()
        await event_log.start()
        log.info("gateway.ready", host=settings.gateway_host, port=settings.gateway_port)
        yield
        await event_log.close()
        await rpc.close()
        await broker.stop()

    app = FastAPI(
        title="ESD API",
        version=API_VERSION,
        description="Stable Diffusion platform speaking the ESD REST API",
        openapi_url="/api",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry spans and metrics: the gateway's metrics are Prometheus's
        # (services/gateway/metrics.py), and asking on every request whether OpenTelemetry is
        # configured cost ~5% of a routed call's CPU
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.rpc = rpc
    app.state.principals = principals
    app.state.completions = completions
    app.state.event_log = event_log
    app.state.settings = settings
    for router in ROUTERS:
        app.include_router(router)
        app.include_router(router, prefix="/prod", include_in_schema=False)
    install_error_handlers(app)
    app.add_middleware(EdgeMiddleware, api_key=api_key, max_body_bytes=settings.max_body_bytes)
    # added last, so outside the key check: the console's files (they hold no data; its API
    # calls carry the key), and the metrics of every request, refused ones too
    app.add_middleware(ConsoleFiles)
    app.add_middleware(RequestMetrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(BODY_DEFINITIONS)
        for model in (ErrorReply, ForbiddenReply):
            components[model.__name__] = model.model_json_schema()
        # FastAPI documents a 422 for every route with parameters; this API answers a bad
        # parameter with a 400 (documented per route), and 422 only for a reused Idempotency-Key
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.get("422", {}).get("description") == "Validation Error":  # FastAPI's, not ours
                    responses.pop("422")
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        schema["components"]["securitySchemes"] = {
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            "username": {"type": "apiKey", "in": "header", "name": "username"},
            "bearerToken": {"type": "http", "scheme": "bearer", "description": "a token from POST /tokens"},
        }
        schema["security"] = [{"apiKey": [], "username": []}, {"apiKey": [], "bearerToken": []}]
        app.openapi_schema = schema
    return app.openapi_schema
