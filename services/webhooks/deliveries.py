"""Deliveries: a job's events to its webhook, as cog sends them (its `webhook` and
`webhook_events_filter`), signed the Standard Webhooks way. Each event becomes one stored
delivery; senders take due deliveries one at a time, so a slow or failing receiver holds up
only its own; a failed attempt is tried again after a growing pause, for a bounded time, then
the delivery is dead-lettered to `webhooks.deliveries.dead`."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import structlog
from faststream.rabbit import RabbitBroker

from services.webhooks import domain
from services.webhooks.domain import Delivery, Subscription
from services.webhooks.store import WebhookStore
from shared.contracts.webhooks import DELIVERIES, DeadDelivery
from shared.errors import Invalid
from shared.messaging import Names
from shared.metrics import WEBHOOK_DELIVERIES, WEBHOOK_SECONDS
from shared.net import public_transport

log = structlog.get_logger(__name__)

SENDERS = 16  # deliveries in flight at once, per replica
IDLE_POLL_SECONDS = 0.5


class Deliveries:
    def __init__(
        self,
        store: WebhookStore,
        broker: RabbitBroker,
        names: Names,
        *,
        secret: str,
        timeout: float,
        retry_for: float,
        allow_private: bool,
    ) -> None:
        self.store = store
        self.broker = broker
        self.names = names
        self.secret = secret
        self.timeout = timeout
        self.retry_for = retry_for
        self.allow_private = allow_private
        self.due = asyncio.Event()  # set when a delivery was added here: no need to wait for the poll

    # --- what the jobs' events say ---

    async def job_created(self, job_id: str, event: dict) -> None:
        if not event.get("webhook"):
            return
        await self.store.subscribe(
            Subscription(
                job_id=job_id,
                url=event["webhook"],
                events=list(event.get("webhook_events_filter") or domain.DEFAULT_FILTER),
                owner=event.get("owner", ""),
                created=time.time(),
            )
        )

    async def job_event(self, job_id: str, routing_key: str, event: dict) -> None:
        subscription = await self.store.subscription(job_id)
        if subscription is None or not domain.wants(subscription, routing_key):
            return
        if domain.is_progress(routing_key):
            now = time.time()
            last_step = event.get("step") == event.get("total", event.get("steps"))
            if now - subscription.last_progress < domain.PROGRESS_EVERY_SECONDS and not last_step:
                return
            await self.store.progress_sent(job_id, now)
        delivery = Delivery(
            id=f"{event.get('id')}:{job_id}",
            job_id=job_id,
            url=subscription.url,
            payload=domain.payload_of(routing_key, event),
            status="pending",
            next_at=time.time(),
        )
        if await self.store.add_delivery(delivery):
            self.due.set()

    # --- sending ---

    async def send_forever(self) -> None:
        senders = [asyncio.create_task(self._sender()) for _ in range(SENDERS)]
        try:
            await asyncio.gather(*senders)
        finally:
            for sender in senders:
                sender.cancel()

    async def _sender(self) -> None:
        while True:
            try:
                delivery = await self.store.claim(lease=self.timeout * 2 + 5)
            except Exception:
                log.warning("webhook.claim_failed", exc_info=True)
                delivery = None
            if delivery is None:
                self.due.clear()
                try:
                    await asyncio.wait_for(self.due.wait(), IDLE_POLL_SECONDS)
                except TimeoutError:
                    pass
                continue
            await self._attempt(delivery)

    async def _attempt(self, delivery: Delivery) -> None:
        now = time.time()
        first = delivery.first_attempt or now
        began = time.perf_counter()
        try:
            await self._post(delivery)
        except Exception as error:
            reason = str(error) or type(error).__name__
            outcome = "dead" if now - first >= self.retry_for else "retry"
            WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
            WEBHOOK_SECONDS.labels(outcome=outcome).observe(time.perf_counter() - began)
            if outcome == "dead":
                await self._give_up(delivery, reason)
                return
            pause = domain.retry_pause(delivery.attempts)
            log.info("webhook.retry", delivery=delivery.id, attempts=delivery.attempts, pause=pause, error=reason)
            await self.store.update(delivery.id, first_attempt=first, next_at=time.time() + pause, last_error=reason)
            return
        WEBHOOK_DELIVERIES.labels(outcome="delivered").inc()
        WEBHOOK_SECONDS.labels(outcome="delivered").observe(time.perf_counter() - began)
        await self.store.update(delivery.id, status="delivered", first_attempt=first, delivered_at=time.time())

    async def _post(self, delivery: Delivery) -> None:
        body = orjson.dumps(delivery.payload.model_dump(mode="json"))
        timestamp = int(time.time())
        message_id = delivery.id.split(":", 1)[0]  # the event's id: a receiver drops repeats by it
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": domain.signature(self.secret, message_id, timestamp, body),
        }
        # the connection goes to the address checked as it was resolved: no DNS rebinding
        transport = public_transport(
            allow_private=self.allow_private, doing="send webhooks to", setting="ESD_WEBHOOK_ALLOW_PRIVATE_URLS"
        )
        async with httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False, trust_env=False, transport=transport
        ) as client:
            response = await client.post(delivery.url, content=body, headers=headers)
        if not 200 <= response.status_code < 300:
            raise Invalid(f"{delivery.url} answered {response.status_code}")

    async def _give_up(self, delivery: Delivery, reason: str) -> None:
        log.warning("webhook.dead", delivery=delivery.id, url=delivery.url, attempts=delivery.attempts, error=reason)
        dead = DeadDelivery(
            delivery_id=delivery.id,
            url=delivery.url,
            payload=delivery.payload,
            attempts=delivery.attempts,
            last_error=reason,
        )
        # straight to the dead-letter queue, as a failing message of a work queue would go
        await self.broker.publish(
            dead.model_dump(mode="json"),
            exchange=self.names.dead_letters,
            routing_key=f"{self.names.prefix}{DELIVERIES}",
            persist=True,
        )
        await self.store.update(delivery.id, status="dead", last_error=reason)
