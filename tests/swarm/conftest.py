"""The platform as swarm services on a one-node Docker swarm (tests/swarm/dockerhost.py), deployed
with `docker stack deploy` from deploy/swarm/stack.yml as the README says, on the host's network,
against RabbitMQ, an nx-27017 server and SeaweedFS running on this host."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from deploy.local.stack import LocalStack, free_port
from shared.rpc import CheckHealth, RpcClient, health_check
from tests.swarm.dockerhost import DOCKER, REPO_ROOT, DockerHost, DockerUnavailable, docker

IMAGE = "esd-platform:e2e"
STACK = "esde2e"
SERVICES = ("identity", "checkpoint", "inference", "training", "webhooks")

pytestmark = pytest.mark.swarm


def say(message: str) -> None:
    print(f"[swarm] {message}", flush=True)


# what the tests measured, printed at the end of the run (pytest would capture it otherwise)
FIGURES: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("swarm figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session", autouse=True)
def _needs_rabbitmq(rabbitmq) -> None:
    """The platform's containers use this host's RabbitMQ."""


@pytest.fixture(scope="session")
def docker_host(tmp_path_factory) -> Iterator[DockerHost]:
    host = DockerHost(tmp_path_factory.mktemp("docker"), say=say)
    try:
        host.install()
        host.start()
    except DockerUnavailable as why:
        host.close()
        pytest.skip(f"Docker cannot run on this machine: {why}")
    try:
        started = time.monotonic()
        host.build(IMAGE)
        say(f"image {IMAGE} built in {time.monotonic() - started:.0f} s")
        host.swarm()
        yield host
    finally:
        host.close()


@dataclass
class SwarmStack:
    servers: LocalStack
    env: dict[str, str]
    gateway_url: str
    api_key: str
    prefix: str
    docker_client: object = field(repr=False)
    logs: LogCollector = field(repr=False)

    def services(self, role: str | None = None) -> list:
        filters = {"label": f"com.docker.stack.namespace={STACK}"}
        return [s for s in self.docker_client.services.list(filters=filters) if role is None or s.name.endswith(role)]

    def service(self, name: str):
        return self.docker_client.services.get(f"{STACK}_{name}")

    def pool(self, endpoint: str):
        return self.docker_client.services.get(f"{self.env['ESD_POOL_NAME_PREFIX']}pool-{endpoint}")

    def containers(self, **labels: str) -> list:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        return self.docker_client.containers.list(all=True, filters=filters)

    def log_events(self, **labels: str) -> list[dict]:
        """Every JSON log line of the containers with these labels, the removed ones included
        (a scaled-down worker's container is gone with its slot: the collector kept its log)."""
        return [event for lines in self.logs.of(labels) for event in _json_lines(lines)]


def _json_lines(lines: list[str]) -> list[dict]:
    events = []
    for line in lines:
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


class LogCollector:
    """Follows the log of every container of the stack from its start to its end, in threads:
    swarm removes a scaled-down task's container, and its log with it."""

    def __init__(self, base_url: str) -> None:
        import docker as docker_sdk

        self.client = docker_sdk.DockerClient(base_url=base_url)
        self.base_url = base_url
        self.lines: dict[str, list[str]] = {}
        self.labels: dict[str, dict[str, str]] = {}
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            try:
                for container in self.client.containers.list(all=True):
                    # a container not started yet has no log to follow: the stream would end at once
                    if container.id not in self.lines and container.status != "created":
                        self.lines[container.id] = []
                        self.labels[container.id] = dict(container.labels)
                        threading.Thread(target=self._follow, args=(container.id,), daemon=True).start()
            except Exception:
                pass  # the daemon is busy or going away: try again
            self.stopping.wait(0.3)

    def _follow(self, container_id: str) -> None:
        import docker as docker_sdk

        client = docker_sdk.APIClient(base_url=self.base_url)
        pending = ""
        try:
            for chunk in client.logs(container_id, stream=True, follow=True, stdout=True, stderr=True):
                pending += chunk.decode(errors="replace")
                *complete, pending = pending.split("\n")
                self.lines[container_id].extend(complete)
        except Exception:
            pass
        if pending:
            self.lines[container_id].append(pending)
        try:  # the whole log once more, while the container is still there: nothing missed
            whole = client.logs(container_id, stdout=True, stderr=True).decode(errors="replace").splitlines()
            if len(whole) > len(self.lines[container_id]):
                self.lines[container_id] = whole
        except Exception:
            pass
        finally:
            client.close()

    def of(self, labels: dict[str, str]) -> list[list[str]]:
        return [
            self.lines[cid]
            for cid, have in list(self.labels.items())
            if all(have.get(key) == value for key, value in labels.items())
        ]

    def container_of(self, lines_with: str) -> str | None:
        for cid, lines in list(self.lines.items()):
            if any(lines_with in line for line in lines):
                return cid
        return None

    def close(self) -> None:
        self.stopping.set()
        self.watcher.join(timeout=5)
        self.client.close()


async def _healthy(amqp_url: str, prefix: str) -> None:
    rpc = RpcClient(amqp_url, prefix, timeout=3)
    try:
        for service in SERVICES:
            deadline = time.monotonic() + 240
            while True:
                try:
                    await rpc.call(health_check(service), CheckHealth())
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the {service} service did not answer within 240 s") from None
                    await asyncio.sleep(1)
    finally:
        await rpc.close()


@pytest.fixture(scope="session")
def swarm_stack(docker_host, tmp_path_factory) -> Iterator[SwarmStack]:
    import docker as docker_sdk

    prefix = f"swarm-{uuid.uuid4().hex[:8]}."
    servers = LocalStack(
        tmp_path_factory.mktemp("servers"),
        mongo_port=free_port(),
        s3_port=free_port(),
        services=[],
        include_gateway=False,
        quiet=True,
    )
    servers.up()  # nx-27017 and SeaweedFS on loopback, and the deployment's keys
    gateway_port = free_port()
    env = {
        "ESD_IMAGE": IMAGE,
        "ESD_NETWORK": "host",  # the routing mesh does not work here: the hosts' network instead
        "ESD_AMQP_URL": servers.amqp_url,
        "ESD_BROKER_PREFIX": prefix,
        "ESD_MONGO_URL": servers.mongo_url,
        "ESD_S3_ENDPOINT_URL": servers.s3_endpoint_url,
        "ESD_S3_ACCESS_KEY": servers.s3_access_key,
        "ESD_S3_SECRET_KEY": servers.s3_secret_key,
        "ESD_API_KEY": servers.api_key,
        "ESD_ADMIN_PASSWORD": servers.admin_password,
        "ESD_WEBHOOK_SECRET": servers.webhook_secret,
        "ESD_GATEWAY_PORT": str(gateway_port),
        "ESD_GATEWAY_REPLICAS": "1",  # one port on one host
        "ESD_SERVICE_REPLICAS": "1",
        "ESD_INFERENCE_REPLICAS": "2",  # a leader and one to take over
        "ESD_TRAINING_WORKER_REPLICAS": "0",
        "ESD_POOL_NAME_PREFIX": f"{STACK}-",
        "ESD_POOL_SCALE_DOWN_AFTER": "3",
        "ESD_WORKER_THREADS": "1",  # this machine's two cores are shared by every container
    }
    client = docker_sdk.DockerClient(base_url="unix:///var/run/docker.sock")
    stack = SwarmStack(
        servers=servers,
        env=env,
        gateway_url=f"http://127.0.0.1:{gateway_port}",
        api_key=servers.api_key,
        prefix=prefix,
        docker_client=client,
        logs=LogCollector("unix:///var/run/docker.sock"),
    )
    try:
        started = time.monotonic()
        import os

        docker(
            "stack", "deploy", "--resolve-image", "never", "-c", str(REPO_ROOT / "deploy/swarm/stack.yml"), STACK,
            env={**os.environ, **env},
        )  # fmt: skip
        asyncio.run(_healthy(servers.amqp_url, prefix))

        def pings() -> bool:
            try:
                response = httpx.get(f"{stack.gateway_url}/ping", headers={"x-api-key": stack.api_key}, timeout=3)
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        deadline = time.monotonic() + 180
        while not pings():
            assert time.monotonic() < deadline, "the gateway did not answer within 180 s"
            time.sleep(1)
        say(f"stack up in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        _save_logs(stack, docker_host.workdir)
        docker("stack", "rm", STACK, check=False)
        for service in client.services.list(filters={"label": "esd.role=inference-worker"}):
            if service.name.startswith(env["ESD_POOL_NAME_PREFIX"]):
                service.remove()
        _wait_gone(client)
        stack.logs.close()
        client.close()
        servers.down()


def _save_logs(stack: SwarmStack, folder: Path) -> None:
    """The containers' logs beside dockerd's, for a failure's post-mortem."""
    for cid, lines in list(stack.logs.lines.items()):
        name = stack.logs.labels[cid].get("com.docker.swarm.task.name", cid[:12])
        (folder / f"{name}.log").write_text("\n".join(lines))


def _wait_gone(client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [c for c in client.containers.list() if c.labels.get("com.docker.swarm.service.name", "")]
        if not running:
            return
        time.sleep(1)
    say(f"containers still running after {timeout:.0f} s; leaving the swarm stops them")


__all__ = ["DOCKER", "SwarmStack"]
