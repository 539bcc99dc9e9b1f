"""The console scripts of the one image (deploy/docker/Dockerfile) beside the gateway's and the
workers': `esd-service <name>` runs a service, `esd-healthcheck [role]` tells the orchestrator
whether this container's process is well.

    esd-gateway | esd-service identity|checkpoint|inference|training|webhooks
    esd-inference-worker --endpoint <name> | esd-training-worker [--once]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

SERVICES = ("identity", "checkpoint", "inference", "training", "webhooks")
ROLES = ("gateway", "service", "inference-worker", "training-worker")


def service() -> None:
    parser = argparse.ArgumentParser(prog="esd-service", description="Run one of the platform's services")
    parser.add_argument("name", choices=SERVICES)
    name = parser.parse_args().name
    sys.argv = [f"services.{name}"]
    runpy.run_module(f"services.{name}", run_name="__main__", alter_sys=True)


def _running_role() -> tuple[str, list[str]] | None:
    """This container's platform process: its role and its arguments (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        for position, argument in enumerate(argv[:3]):
            program = os.path.basename(argument)
            if program.startswith("esd-") and program.removeprefix("esd-") in ROLES:
                return program.removeprefix("esd-"), argv[position + 1 :]
    return None


def _broker_reachable() -> bool:
    from shared.settings import get_settings

    url = urlparse(get_settings().amqp_url)
    try:
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 5672), timeout=3):
            return True
    except OSError:
        return False


async def _service_answers(name: str) -> bool:
    from shared.rpc import CheckHealth, RpcClient, health_check
    from shared.settings import get_settings

    settings = get_settings()
    client = RpcClient(settings.amqp_url, settings.broker_prefix, timeout=5)
    try:
        await client.call(health_check(name), CheckHealth())
        return True
    except Exception:
        return False
    finally:
        await client.close()


def _gateway_answers() -> bool:
    import httpx

    from shared.settings import get_settings

    settings = get_settings()
    try:
        response = httpx.get(
            f"http://127.0.0.1:{settings.gateway_port}/ping",
            headers={"x-api-key": settings.api_key.get_secret_value()},
            timeout=4,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def healthcheck() -> None:
    """Exit 0 when well: the gateway answers /ping; a service's process runs and the service
    answers its health command over the broker; a worker's process runs and reaches the broker
    (a worker's readiness is its heartbeat, which the inference service reads)."""
    parser = argparse.ArgumentParser(prog="esd-healthcheck")
    parser.add_argument("role", nargs="?", choices=ROLES, help="default: the role of the process this container runs")
    parser.add_argument("name", nargs="?", help="the service's name (role `service`)")
    args = parser.parse_args()
    running = _running_role()
    role, name = args.role, args.name
    if role is None:
        if running is None:
            sys.exit("no platform process runs here")
        role = running[0]
        name = running[1][0] if role == "service" and running[1] else None
    elif running is None or running[0] != role:
        sys.exit(f"no {role} process runs here")
    if role == "gateway":
        well = _gateway_answers()
    elif role == "service":
        well = name in SERVICES and asyncio.run(_service_answers(name))
    else:
        well = _broker_reachable()
    sys.exit(0 if well else f"{role} {name or ''} is not well".replace("  ", " "))
