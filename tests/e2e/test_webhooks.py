"""Webhooks as cog has them (`webhook`, `webhook_events_filter`), signed the Standard Webhooks
way, retried while the receiver fails, then dead-lettered."""

import base64
import hashlib
import hmac
import http.server
import json
import threading
import time

import aio_pika
import pytest

from tests.e2e.test_inference import payload, tiny_models, unique, wait_endpoint  # noqa: F401
from tests.support import wait_for

pytestmark = pytest.mark.e2e


class Receiver:
    """A webhook receiver on loopback: records what comes, answers `status`."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self) -> list[str]:
        return [json.loads(body)["type"] for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()


def verified(secret: str, headers: dict, body: bytes) -> bool:
    """Standard Webhooks: HMAC-SHA256 of `<id>.<timestamp>.<body>` with the secret's bytes."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(expected, part.removeprefix("v1,")) for part in headers["webhook-signature"].split())


@pytest.fixture(scope="module")
def hook_endpoint(api, tiny_models):  # noqa: F811
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("hooks")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "assign_to_roles": ["IT Operator"],
        },
    )
    name = response.json()["data"]["endpoint_name"]
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def submit(api, endpoint: str, model: str, **webhook) -> str:
    response = api(
        "POST",
        "/inferences",
        json={
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": [model]},
            "sagemaker_endpoint_name": endpoint,
            "payload_string": json.dumps(payload(steps=3)),
            **webhook,
        },
    )
    assert response.status_code == 202, response.text
    return response.json()["data"]["inference"]["inference_id"]


def test_a_job_posts_its_events_to_its_webhook_signed(api, stack, hook_endpoint, tiny_models):  # noqa: F811
    receiver = Receiver()
    try:
        inference_id = submit(api, hook_endpoint, tiny_models["model"], webhook=receiver.url)
        wait_for(lambda: "inference.succeeded" in receiver.types(), timeout=120, what="the completed webhook")
        types = receiver.types()
        assert types[0] == "inference.started" and "inference.progress" in types, types
        for headers, body in receiver.received:
            assert verified(stack.webhook_secret, headers, body)
            assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300
            event = json.loads(body)["data"]
            assert event["inference_id"] == inference_id and headers["webhook-id"] == event["id"]
        assert not verified("whsec_" + base64.b64encode(b"not the secret").decode(), *receiver.received[0])
    finally:
        receiver.close()


def test_the_filter_picks_the_events(api, hook_endpoint, tiny_models):  # noqa: F811
    receiver = Receiver()
    try:
        submit(api, hook_endpoint, tiny_models["model"], webhook=receiver.url, webhook_events_filter=["completed"])
        wait_for(lambda: receiver.received, timeout=120, what="the completed webhook")
        time.sleep(1)
        assert receiver.types() == ["inference.succeeded"]
    finally:
        receiver.close()


def test_a_failing_receiver_is_retried_then_dead_lettered(api, stack, hook_endpoint, tiny_models):  # noqa: F811
    receiver = Receiver(status=503)
    try:
        inference_id = submit(
            api, hook_endpoint, tiny_models["model"], webhook=receiver.url, webhook_events_filter=["completed"]
        )
        # the stack retries for ESD_WEBHOOK_RETRY_FOR seconds (a few, in these tests), 1 s, 2 s, ... apart
        dead = wait_for(lambda: dead_letter(stack, inference_id), timeout=60, what="the dead letter")
        assert dead["attempts"] >= 3 and len(receiver.received) == dead["attempts"]
        assert dead["payload"]["type"] == "inference.succeeded" and "503" in dead["last_error"]
    finally:
        receiver.close()


def dead_letter(stack, inference_id: str) -> dict | None:
    import asyncio

    async def look() -> dict | None:
        connection = await aio_pika.connect(stack.amqp_url)
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(f"{stack.env['ESD_BROKER_PREFIX']}webhooks.deliveries.dead", ensure=False)
            while (message := await queue.get(fail=False)) is not None:
                dead = json.loads(message.body)
                if dead["payload"]["data"].get("inference_id") == inference_id:
                    await message.ack()
                    return dead
                await message.nack(requeue=True)
                return None
            return None
        finally:
            await connection.close()

    return asyncio.run(look())
