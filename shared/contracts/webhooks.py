"""The webhooks service's contracts: what a webhook receiver gets, and the queue where
deliveries that never got through end up."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

SERVICE = "webhooks"
DELIVERIES = "webhooks.deliveries"  # its dead-letter queue, `webhooks.deliveries.dead`, holds the undeliverable


class WebhookPayload(BaseModel):
    """The body POSTed to a job's webhook (the Standard Webhooks shape): the event's type, when
    it happened (ISO 8601) and the event itself. Headers `webhook-id`, `webhook-timestamp` and
    `webhook-signature` sign it."""

    type: str
    timestamp: str
    data: dict[str, Any]


class DeadDelivery(BaseModel):
    """A delivery given up after retrying for `ESD_WEBHOOK_RETRY_FOR` seconds."""

    delivery_id: str
    url: str
    payload: WebhookPayload
    attempts: int
    last_error: str
