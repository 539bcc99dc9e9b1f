"""The AsyncAPI (3.0) document of the bus: every event on the `esd.events` topic exchange, every
request/reply command, and the work queues, each with the JSON schema of its message, built
from the contracts themselves (so it cannot drift from them)."""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import BaseModel

from shared import rpc
from shared.messaging import EVENTS_EXCHANGE, Event

REF = "#/components/schemas/{model}"
CONTRACTS = ("identity", "checkpoint", "inference", "training", "webhooks", "workers")


def _events() -> list[type[Event]]:
    found: list[type[Event]] = []
    pending = list(Event.__subclasses__())
    while pending:
        event = pending.pop(0)
        pending.extend(event.__subclasses__())
        if "routing_key" in vars(event):  # a concrete event, not a base of some
            found.append(event)
    return sorted(found, key=lambda event: event.routing_key)


class _Document:
    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}

    def message(self, model: type[BaseModel], summary: str = "") -> dict[str, str]:
        schema = model.model_json_schema(ref_template=REF)
        self.schemas.update(schema.pop("$defs", {}))
        self.schemas[model.__name__] = schema
        self.messages[model.__name__] = {
            "name": model.__name__,
            "title": model.__name__,
            "summary": summary or (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
            "contentType": "application/json",
            "payload": {"$ref": REF.format(model=model.__name__)},
        }
        return {"$ref": f"#/components/messages/{model.__name__}"}

    def channel(self, key: str, address: str, description: str, *messages: dict[str, str], amqp: dict) -> None:
        self.channels[key] = {
            "address": address,
            "description": description,
            "messages": {ref["$ref"].rsplit("/", 1)[-1]: ref for ref in messages},
            "bindings": {"amqp": amqp},
        }

    def operation(self, key: str, action: str, channel: str, summary: str, reply: str | None = None) -> None:
        operation: dict[str, Any] = {"action": action, "channel": {"$ref": f"#/channels/{channel}"}, "summary": summary}
        if reply is not None:
            operation["reply"] = {"channel": {"$ref": f"#/channels/{reply}"}}
        self.operations[key] = operation


def asyncapi_document(version: str, prefix: str = "") -> dict[str, Any]:
    for module in CONTRACTS:  # declares every command and event
        importlib.import_module(f"shared.contracts.{module}")
    doc = _Document()
    exchange = f"{prefix}{EVENTS_EXCHANGE}"
    for event in _events():
        key = event.routing_key.replace(".", "_")
        doc.channel(
            key,
            event.routing_key,
            f"Published on the topic exchange `{exchange}` with routing key `{event.routing_key}`.",
            doc.message(event),
            amqp={"is": "routingKey", "exchange": {"name": exchange, "type": "topic", "durable": True}},
        )
        doc.operation(f"on_{key}", "receive", key, f"Bind a queue to `{exchange}` with `{event.routing_key}`.")
    for (service, name), command in sorted(rpc._DECLARED.items()):
        key = f"{service}_{name}"
        queue = command.queue(prefix)
        doc.channel(
            key,
            queue,
            f"Request/reply: requests go to the queue `{queue}` in batches "
            "(`[[correlation id, request], ...]`), replies to the caller's `reply_to` queue "
            '(`[[correlation id, "result" | "error", body], ...]`).',
            doc.message(command.request),
            amqp={"is": "queue", "queue": {"name": queue, "durable": True}},
        )
        reply_key = f"{key}_reply"
        reply_messages = [doc.message(command.reply)] if isinstance(command.reply, type) else []
        doc.channel(
            reply_key, None, f"The reply to {name} (the caller's reply queue).", *reply_messages, amqp={"is": "queue"}
        )
        doc.operation(key, "send", key, f"The {service} service's `{name}` command.", reply=reply_key)
    from shared.contracts.checkpoint import DOWNLOADS, RENAMES, DownloadCheckpoint, RenameCheckpoint
    from shared.contracts.inference import HEARTBEATS as INFERENCE_BEATS
    from shared.contracts.inference import RunInference
    from shared.contracts.training import HEARTBEATS as TRAINING_BEATS
    from shared.contracts.training import JOBS, RunTraining
    from shared.contracts.workers import WorkerHeartbeat

    work = [
        ("inference.{endpoint_name}", RunInference, "An endpoint's jobs: its workers take one at a time."),
        (JOBS, RunTraining, "Training jobs: each training worker takes one at a time."),
        (DOWNLOADS, DownloadCheckpoint, "By-URL checkpoint downloads."),
        (RENAMES, RenameCheckpoint, "Checkpoint renames."),
        (INFERENCE_BEATS, WorkerHeartbeat, "Inference workers' heartbeats."),
        (TRAINING_BEATS, WorkerHeartbeat, "Training workers' heartbeats."),
    ]
    for queue, model, description in work:
        key = queue.replace(".", "_").replace("{", "").replace("}", "")
        durable = "Durable; a message its consumer rejects goes to `<queue>.dead`." if "heartbeat" not in queue else ""
        doc.channel(
            key,
            f"{prefix}{queue}",
            f"{description} {durable}".strip(),
            doc.message(model),
            amqp={"is": "queue", "queue": {"name": f"{prefix}{queue}", "durable": True}},
        )
        doc.operation(f"work_{key}", "send", key, description)
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "ESD platform: the bus",
            "version": version,
            "description": "Events, commands and work queues between the ESD platform's processes, over RabbitMQ. "
            "Every event carries `id`, `occurred_at` and `version`; a consumer drops repeats by `id`.",
        },
        "defaultContentType": "application/json",
        "channels": doc.channels,
        "operations": doc.operations,
        "components": {"messages": doc.messages, "schemas": doc.schemas},
    }
