"""The `swarm` pool backend: an endpoint's pool is one replicated Docker swarm service of the
worker image, `<prefix>pool-<endpoint>`, labelled with its endpoint and instance type, and
scaled through the Docker Engine API by the inference service's autoscaler (the same rule as
`local`).

The Docker SDK is synchronous: every call runs in a thread, off the event loop. Swarm restarts
a worker whose container dies; on scale-down it stops surplus containers with SIGTERM and
waits `stop_grace_period` (longer than a worker's drain) before killing them, so a worker
finishes its job, or gives it back, first."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import structlog

from shared.pools import PoolSpec

log = structlog.get_logger(__name__)

ROLE_LABEL = "esd.role"
POOL_LABEL = "esd.pool"
INSTANCE_TYPE_LABEL = "esd.instance-type"
# time for the container to stop beyond the worker's own drain deadline (reporting, closing)
STOP_MARGIN_SECONDS = 30
_UNITS = {"": 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def memory_bytes(quantity: str) -> int:
    """`16Gi` (Kubernetes' form, as instance types write it) in bytes."""
    match = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|Ti)?", quantity)
    if match is None:
        raise ValueError(f"not a memory quantity: {quantity}")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


class SwarmPool:
    scales_itself = False

    def __init__(
        self,
        *,
        image: str,
        prefix: str,
        network: str,
        env: dict[str, str],
        drain_seconds: float,
        client: Any = None,
    ) -> None:
        self.image = image
        self.prefix = prefix
        self.network = network
        self.env = env
        self.drain_seconds = drain_seconds
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import docker  # only where this backend is chosen

            self._client = docker.from_env()
        return self._client

    def service_name(self, endpoint: str) -> str:
        return f"{self.prefix}pool-{endpoint}"[:63]

    def service_spec(self, spec: PoolSpec) -> dict[str, Any]:
        """The arguments of `services.create` for the pool's service (no replicas yet)."""
        from docker.types import Resources, RestartPolicy, ServiceMode

        placement = spec.placement
        labels = {ROLE_LABEL: "inference-worker", POOL_LABEL: spec.name, INSTANCE_TYPE_LABEL: spec.instance_type}
        resources: dict[str, Any] = {}
        if placement.cpus:
            resources["cpu_reservation"] = int(placement.cpus * 1e9)
        if placement.memory:
            resources["mem_reservation"] = memory_bytes(placement.memory)
        if placement.gpus:
            resources["generic_resources"] = {placement.gpu_resource: placement.gpus}
        return {
            "image": self.image,
            "command": ["esd-inference-worker", "--endpoint", spec.name],
            "name": self.service_name(spec.name),
            "labels": labels,
            "container_labels": labels,
            # each worker is named after its task (`<service>.<slot>.<task id>`, a template swarm fills in)
            "env": [f"{key}={value}" for key, value in self.env.items()] + ["ESD_WORKER_ID={{.Task.Name}}"],
            "mode": ServiceMode("replicated", replicas=0),
            "networks": [self.network] if self.network else None,
            "constraints": [f"node.labels.{key}=={value}" for key, value in sorted(placement.node_labels.items())],
            "resources": Resources(**resources) if resources else None,
            "stop_grace_period": int((self.drain_seconds + STOP_MARGIN_SECONDS) * 1e9),  # nanoseconds
            "init": True,  # an init as PID 1 passes SIGTERM on and reaps
            "restart_policy": RestartPolicy(condition="any", delay=1_000_000_000),
        }

    async def create(self, spec: PoolSpec) -> None:
        await asyncio.to_thread(self._create, spec)

    def _create(self, spec: PoolSpec) -> None:
        if self._service(spec.name) is not None:
            return  # made already (by another replica, or before a restart)
        from docker.errors import APIError

        try:
            self.client.services.create(**self.service_spec(spec))
        except APIError as error:
            if error.status_code != 409:  # a concurrent create of the same name is fine
                raise
        log.info("pool.service_created", endpoint=spec.name, service=self.service_name(spec.name))

    def _service(self, endpoint: str) -> Any:
        from docker.errors import NotFound

        try:
            return self.client.services.get(self.service_name(endpoint))
        except NotFound:
            return None

    async def scale(self, endpoint: str, count: int) -> None:
        await asyncio.to_thread(self._scale, endpoint, count)

    def _scale(self, endpoint: str, count: int) -> None:
        from docker.errors import APIError

        for attempt in range(5):
            service = self._service(endpoint)
            if service is None:
                log.warning("pool.service_missing", endpoint=endpoint, service=self.service_name(endpoint))
                return
            if _replicas(service) == count:
                return
            try:
                service.scale(count)
            except APIError as error:
                # another update came first (its version is newer): read it again and retry
                if "out of sequence" not in str(error) or attempt == 4:
                    raise
                continue
            log.info("pool.service_scaled", endpoint=endpoint, replicas=count)
            return

    async def count(self, endpoint: str) -> int:
        return await asyncio.to_thread(self._count, endpoint)

    def _count(self, endpoint: str) -> int:
        service = self._service(endpoint)
        return 0 if service is None else _replicas(service)

    async def stop(self, endpoint: str) -> None:
        await asyncio.to_thread(self._remove, endpoint)

    def _remove(self, endpoint: str) -> None:
        from docker.errors import NotFound

        service = self._service(endpoint)
        if service is None:
            return
        try:
            service.remove()  # its containers get SIGTERM and their stop grace period
        except NotFound:
            return
        log.info("pool.service_removed", endpoint=endpoint)

    async def close(self) -> None:
        # the pools outlive this process: another replica of the service keeps sizing them
        if self._client is not None:
            await asyncio.to_thread(self._client.close)


def _replicas(service: Any) -> int:
    return int(service.attrs["Spec"]["Mode"].get("Replicated", {}).get("Replicas", 0))
