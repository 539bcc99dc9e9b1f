"""Load: many clients submitting jobs at once against the local stack.

Starts a private stack (as bench/dispatch.py does), uploads the tiny model, makes an Async
endpoint with a pool of 2 workers, and has 32 clients submit 500 txt2img jobs (64x64, 2 steps,
one call each with an Idempotency-Key, tests/faults/load.py) as fast as the API takes them.
Prints jobs per second (from the first job's creation to the last one's end), the time from
submit to done (p50, p99), and how many jobs were lost or had their images twice (both must be
0). Figures, not pass/fail.

    .venv/bin/python bench/load.py [--jobs 500] [--clients 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import httpx
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the load client lives with the tests

from tests.faults.load import Load, percentile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from deploy.local.first_image import TINY_MODEL, Client, _ensure_model
    from deploy.local.stack import LocalStack, free_port

    with tempfile.TemporaryDirectory(prefix="esd-load-") as var:
        stack = LocalStack(
            Path(var) / "stack",
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={
                "ESD_BROKER_PREFIX": f"load-{uuid.uuid4().hex[:6]}.",
                "ESD_LOG_LEVEL": "WARNING",
                "ESD_TRAINING_WORKERS": "0",
            },
            quiet=True,
        )
        stack.up()
        try:
            _ensure_model(Client(stack.gateway_url, stack.api_key, stack.admin_username), Path(var), lambda _: None)
            http = httpx.Client(
                base_url=stack.gateway_url,
                headers={"x-api-key": stack.api_key, "username": stack.admin_username},
                timeout=60,
            )
            endpoint = http.post(
                "/endpoints",
                json={
                    "endpoint_name": "load",
                    "endpoint_type": "Async",
                    "instance_type": "local",
                    "initial_instance_count": args.workers,
                    "autoscaling_enabled": False,
                    "assign_to_roles": ["IT Operator"],
                },
            ).json()["data"]["endpoint_name"]
            while not any(
                e["endpoint_name"] == endpoint and e["current_instance_count"] == str(args.workers)
                for e in http.get("/endpoints").json()["data"]["endpoints"]
            ):
                time.sleep(0.5)
            storage = boto3.client(
                "s3",
                endpoint_url=stack.s3_endpoint_url,
                aws_access_key_id=stack.s3_access_key,
                aws_secret_access_key=stack.s3_secret_key,
                region_name="us-east-1",
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
            )
            load = Load(
                stack.gateway_url,
                stack.api_key,
                stack.admin_username,
                endpoint,
                TINY_MODEL,
                clients=args.clients,
                readers=0,
                pause=0,
                timeout=120,
                total=args.jobs,
            )
            began = time.monotonic()
            with load:
                load.wait_submitted()
                submitted = time.monotonic() - began
            figures = load.settle(storage, "esd", timeout=1800)
        finally:
            stack.down()

    calls = [call for call in load.calls if call.method == "POST"]
    print(f"{args.jobs} txt2img jobs (64x64, 2 steps, tiny model) from {args.clients} clients, {args.workers} workers")
    print(
        f"  submitted in                {submitted:8.1f} s   ({len(calls)} POSTs, {figures.unavailable} answered 503)"
    )
    print(f"  throughput                  {figures.completed / figures.span if figures.span else 0:8.2f} jobs/s")
    print(f"  submit to done, p50         {percentile(figures.latencies, 50):8.2f} s")
    print(f"  submit to done, p99         {percentile(figures.latencies, 99):8.2f} s")
    print(f"  completed / failed          {figures.completed} / {figures.failed}")
    print(f"  lost / duplicated           {figures.lost} / {figures.duplicated}")


if __name__ == "__main__":
    main()
