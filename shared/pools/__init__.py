"""Pool backends: what starts and stops the workers of a pool (an inference endpoint's).

- `local` (`local.py`): worker processes on this host, the embedded default;
- `swarm` (`swarm.py`): one Docker swarm service per endpoint, scaled through the Engine API;
- `kubernetes` (`kubernetes.py`): a Deployment per endpoint, scaled by a KEDA ScaledObject.

`local` and `swarm` are sized by the inference service's autoscaler (one replica of the service
at a time runs it); a backend that `scales_itself` (Kubernetes: KEDA) is only created, sized by
hand when the endpoint does not autoscale, and deleted. Workers announce themselves by
heartbeat; a backend only knows what it asked for."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Protocol

from shared.instance_types import InstanceType
from shared.pools.local import LocalPool
from shared.settings import Settings

__all__ = ["LocalPool", "PoolBackend", "PoolSpec", "default_worker_id", "make_pool_backend", "worker_environment"]


def default_worker_id() -> str:
    """A worker's name in its pool when it is not given one: `ESD_WORKER_ID` (a swarm task's
    name, a pod's), else this host's name and a nonce, as containers on the host's network
    share its name."""
    return os.environ.get("ESD_WORKER_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class PoolSpec:
    """What a backend needs to make a pool: the endpoint's name and limits, the queue whose depth
    sizes it, and its instance type's entry (placement and resources)."""

    name: str
    queue: str  # the work queue's full name on the broker (prefix included)
    instance_type: str
    placement: InstanceType
    minimum: int
    maximum: int
    initial: int
    autoscaling: bool


class PoolBackend(Protocol):
    # True where something else (KEDA) sizes the pools by their queues
    scales_itself: bool

    async def create(self, spec: PoolSpec) -> None:
        """Make the pool exist (idempotent); `scale` gives it workers."""

    async def scale(self, endpoint: str, count: int) -> None:
        """Start or stop workers until the endpoint has `count`."""

    async def count(self, endpoint: str) -> int:
        """Workers asked for and not yet gone."""

    async def stop(self, endpoint: str) -> None:
        """Remove the pool: every worker stops, letting a running job finish first."""

    async def close(self) -> None:
        """The service is shutting down (local workers go with it; swarm and Kubernetes pools
        outlive it)."""


# Settings a worker must not inherit from the service that starts it: they are about pools.
_NOT_FOR_WORKERS = {
    "ESD_POOL_BACKEND",
    "ESD_INSTANCE_TYPES",
    "ESD_INSTANCE_TYPES_FILE",
    "ESD_GATEWAY_PORT",
    "ESD_API_KEY",
    "ESD_ADMIN_PASSWORD",
}


def worker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The settings a swarm worker gets: the inference service's own (broker, storage,
    logging...), as workers read the same variables."""
    environ = dict(os.environ if environ is None else environ)
    return {
        key: value
        for key, value in sorted(environ.items())
        if (key.startswith("ESD_") or key in ("MONGO_URL", "S3_ENDPOINT_URL")) and key not in _NOT_FOR_WORKERS
    }


def make_pool_backend(settings: Settings) -> PoolBackend:
    """The backend the settings name (`ESD_POOL_BACKEND`); the Docker and Kubernetes clients
    are imported only when chosen."""
    if settings.pool_backend == "swarm":
        from shared.pools.swarm import SwarmPool

        return SwarmPool(
            image=settings.worker_image,
            prefix=settings.pool_name_prefix,
            network=settings.swarm_network,
            env=worker_environment(),
            drain_seconds=settings.realtime_timeout,
        )
    if settings.pool_backend == "kubernetes":
        from shared.pools.kubernetes import KubernetesPool, KubernetesPoolConfig

        return KubernetesPool(
            KubernetesPoolConfig.from_settings(settings),
        )
    return LocalPool(settings.var_dir.resolve() / "log", max_workers=settings.local_max_workers)
