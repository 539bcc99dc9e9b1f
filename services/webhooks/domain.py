"""The webhooks service's records and decisions: which of a job's events a webhook wants, how a
delivery is signed, and when a failed one is tried again. Pure: no I/O."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from shared.contracts.webhooks import WebhookPayload

# cog's filter names -> the job events they mean
EVENTS_OF = {
    "start": {"inference.started", "training.started"},
    "progress": {"inference.progress", "training.progress"},
    "completed": {
        "inference.succeeded",
        "inference.failed",
        "inference.canceled",
        "training.completed",
        "training.failed",
        "training.stopped",
    },
}
DEFAULT_FILTER = ("start", "progress", "completed")
PROGRESS_EVERY_SECONDS = 0.5  # progress deliveries per job, at most (the last step always goes)
FIRST_RETRY_SECONDS = 1.0
LONGEST_PAUSE_SECONDS = 300.0


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Subscription(Record):
    """A job's webhook: where its events go and which of them."""

    job_id: str
    url: str
    events: list[str]  # the filter
    owner: str
    created: float
    last_progress: float = 0.0


class Delivery(Record):
    id: str  # <event id>:<job id>: one delivery per event and webhook, however often the event comes
    job_id: str
    url: str
    payload: WebhookPayload
    status: str  # pending | delivered | dead
    attempts: int = 0
    first_attempt: float | None = None
    next_at: float
    last_error: str | None = None


def wants(subscription: Subscription, routing_key: str) -> bool:
    return any(routing_key in EVENTS_OF.get(name, ()) for name in subscription.events)


def is_progress(routing_key: str) -> bool:
    return routing_key.endswith(".progress")


def payload_of(routing_key: str, event: dict) -> WebhookPayload:
    occurred = datetime.fromtimestamp(float(event.get("occurred_at", 0.0)), UTC)
    return WebhookPayload(type=routing_key, timestamp=occurred.isoformat().replace("+00:00", "Z"), data=event)


def retry_pause(attempts: int) -> float:
    """After the n-th failed attempt: 1 s, 2 s, 4 s... at most 5 minutes."""
    return min(FIRST_RETRY_SECONDS * 2 ** max(attempts - 1, 0), LONGEST_PAUSE_SECONDS)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks signature header: `v1,` and the base64 HMAC-SHA256, keyed with
    the secret's bytes, of `<id>.<timestamp>.<body>`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
