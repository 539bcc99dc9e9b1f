"""How soon a finished job is known: from the worker's report to an SSE client, to an AMQP
subscriber and to a webhook receiver.

Starts a private stack, runs `--jobs` small txt2img jobs of the tiny model (each with a webhook
for its `completed` event) on a pool of workers, and measures for each job, on this machine's
one clock, the delay from the moment the inference service took the worker's report (the
`occurred_at` of `inference.succeeded`) to:

- a client following `GET /events?type=inference.succeeded` (Server-Sent Events);
- a client's own queue bound to the `esd.events` exchange (AMQP);
- a webhook receiver (the signed POST of the webhooks service).

It prints p50 and p99 of each.

    .venv/bin/python bench/events.py [--jobs 100] [--workers 2]
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


class Arrivals:
    """When each job's `inference.succeeded` reached each kind of client."""

    def __init__(self) -> None:
        self.at: dict[str, dict[str, float]] = {"sse": {}, "amqp": {}, "webhook": {}}
        self.occurred: dict[str, float] = {}
        self.lock = threading.Lock()

    def saw(self, channel: str, event: dict) -> None:
        now = time.time()
        with self.lock:
            self.at[channel].setdefault(event["inference_id"], now)
            self.occurred[event["inference_id"]] = event["occurred_at"]

    def delays_ms(self, channel: str) -> list[float]:
        return [1000 * (at - self.occurred[job]) for job, at in self.at[channel].items()]


def follow_sse(url: str, headers: dict, arrivals: Arrivals, stop: threading.Event) -> None:
    with httpx.stream(
        "GET", f"{url}/events", params={"type": "inference.succeeded"}, headers=headers, timeout=None
    ) as response:
        data = None
        for line in response.iter_lines():
            if stop.is_set():
                return
            if line.startswith("data: "):
                data = json.loads(line[6:])
            elif not line and data is not None:
                arrivals.saw("sse", data)
                data = None


def follow_amqp(
    amqp_url: str, exchange: str, arrivals: Arrivals, ready: threading.Event, stop: threading.Event
) -> None:
    """A client's own queue bound to the events exchange, noting each event as it arrives."""
    import asyncio

    import aio_pika

    async def consume() -> None:
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel()
        events = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, routing_key="inference.succeeded")

        async def on_message(message) -> None:
            arrivals.saw("amqp", json.loads(message.body))
            await message.ack()

        await queue.consume(on_message)
        ready.set()
        await asyncio.to_thread(stop.wait)  # the main thread's signal
        await connection.close()

    asyncio.run(consume())


def receiver(arrivals: Arrivals) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            arrivals.saw("webhook", json.loads(body)["data"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from deploy.local.first_image import TINY_MODEL, Client, _ensure_model
    from deploy.local.stack import LocalStack, free_port

    with tempfile.TemporaryDirectory(prefix="esd-bench-") as var:
        stack = LocalStack(
            Path(var) / "stack",
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={
                "ESD_BROKER_PREFIX": f"bench-{uuid.uuid4().hex[:6]}.",
                "ESD_LOG_LEVEL": "WARNING",
                "ESD_WEBHOOK_ALLOW_PRIVATE_URLS": "true",
            },
            quiet=True,
        )
        stack.up()
        arrivals, stop = Arrivals(), threading.Event()
        server, hook = receiver(arrivals)
        headers = {"x-api-key": stack.api_key, "username": stack.admin_username}
        ready = threading.Event()
        exchange = f"{stack.env['ESD_BROKER_PREFIX']}esd.events"
        try:
            threading.Thread(
                target=follow_amqp, args=(stack.amqp_url, exchange, arrivals, ready, stop), daemon=True
            ).start()
            ready.wait(30)
            threading.Thread(target=follow_sse, args=(stack.gateway_url, headers, arrivals, stop), daemon=True).start()
            client = Client(stack.gateway_url, stack.api_key, stack.admin_username)
            _ensure_model(client, Path(var), lambda _: None)
            endpoint = client.call(
                "POST",
                "/endpoints",
                (202,),
                json={
                    "endpoint_name": "events",
                    "endpoint_type": "Async",
                    "instance_type": "local",
                    "initial_instance_count": args.workers,
                    "assign_to_roles": ["IT Operator"],
                },
            )["data"]["endpoint_name"]
            while client.call("GET", "/endpoints", (200,))["data"]["endpoints"][0]["current_instance_count"] != str(
                args.workers
            ):
                time.sleep(0.2)
            body = {"prompt": "a cube", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 1}
            for _ in range(args.jobs):
                client.call(
                    "POST",
                    "/inferences",
                    (202,),
                    json={
                        "task_type": "txt2img",
                        "inference_type": "Async",
                        "sagemaker_endpoint_name": endpoint,
                        "models": {"Stable-diffusion": [TINY_MODEL]},
                        "payload_string": json.dumps(body),
                        "webhook": hook,
                        "webhook_events_filter": ["completed"],
                    },
                )
            deadline = time.monotonic() + 60 + args.jobs * 5
            while time.monotonic() < deadline:
                if all(len(arrivals.at[channel]) >= args.jobs for channel in arrivals.at):
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            server.shutdown()
            stack.down()

    print(f"{args.jobs} jobs of the tiny model on {args.workers} workers; delay from the worker's report")
    print(f"{'client':<32}{'jobs':>6}{'p50 ms':>10}{'p99 ms':>10}")
    for channel, name in (("sse", "SSE (GET /events)"), ("amqp", "AMQP subscriber"), ("webhook", "webhook receiver")):
        delays = arrivals.delays_ms(channel)
        if not delays:
            print(f"{name:<32}{0:>6}{'-':>10}{'-':>10}")
            continue
        print(f"{name:<32}{len(delays):>6}{statistics.median(delays):>10.1f}{percentile(delays, 0.99):>10.1f}")


if __name__ == "__main__":
    main()
