"""Where the webhooks service's messages enter: every job event of the inference and training
services (a durable queue each, so that a job's events are taken in order)."""

from __future__ import annotations

from faststream.rabbit import RabbitMessage

from services.webhooks.deliveries import Deliveries
from shared.contracts.webhooks import SERVICE
from shared.service import Runtime

# domain -> the field that names the job, and the event that says where its webhook goes
_JOBS = {"inference": ("inference_id", "inference.created"), "training": ("training_id", "training.created")}


def register(runtime: Runtime, deliveries: Deliveries) -> None:
    for domain, (field, created) in _JOBS.items():
        _follow(runtime, deliveries, domain, field, created)


def _follow(runtime: Runtime, deliveries: Deliveries, domain: str, field: str, created: str) -> None:
    names = runtime.names

    @runtime.broker.subscriber(names.event_queue(SERVICE, domain, f"{domain}.*"), names.events)
    async def job_event(event: dict, message: RabbitMessage) -> None:
        routing_key = message.raw_message.routing_key or ""
        job_id = event.get(field)
        if not job_id:
            return
        if routing_key == created:
            await deliveries.job_created(job_id, event)
        else:
            await deliveries.job_event(job_id, routing_key, event)
