"""The `kubernetes` pool backend: an endpoint's pool is a Deployment of the worker image and, when
the endpoint autoscales, a KEDA ScaledObject that sizes it by the endpoint's queue.

KEDA reads the queue through RabbitMQ's management API (`protocol: http`, `mode: QueueLength`):
that count includes the messages workers hold unacknowledged, one per running job. Over AMQP
KEDA would see only the ready messages, find the queue empty while every worker is busy, and
scale the busy workers away mid-job. The Deployment's `terminationGracePeriodSeconds` is longer
than a worker's drain, so a worker that is scaled down finishes its job (or gives it back)
first. Async endpoints scale to 0.

The objects are plain dicts built by pure functions (`deployment`, `scaled_object`), which the
tests validate against the Kubernetes and KEDA schemas; the official async client
(`kubernetes_asyncio`) sends them."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from shared.pools import PoolSpec
from shared.settings import Settings

log = structlog.get_logger(__name__)

KEDA_GROUP, KEDA_VERSION = "keda.sh", "v1alpha1"
POOL_LABEL = "esd.platform/pool"  # the endpoint's name
STOP_MARGIN_SECONDS = 30
# where every pod serves its metrics (ESD_METRICS_PORT in deploy/kubernetes/config.yaml), and the
# annotations that have Prometheus scrape it
METRICS_PORT = 9100
SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class KubernetesPoolConfig:
    namespace: str
    image: str
    prefix: str = "esd-"
    drain_seconds: float = 300.0
    cooldown_seconds: int = 60  # idle time before KEDA scales a pool down
    polling_seconds: int = 5
    config_map: str = "esd-config"  # the settings every process of the deployment shares
    secret: str = "esd-secrets"
    trigger_auth: str = "esd-rabbitmq-management"

    @classmethod
    def from_settings(cls, settings: Settings) -> KubernetesPoolConfig:
        namespace = settings.kubernetes_namespace
        if not namespace:  # the namespace this pod runs in
            namespace = _NAMESPACE_FILE.read_text().strip() if _NAMESPACE_FILE.exists() else "esd"
        return cls(
            namespace=namespace,
            image=settings.worker_image,
            prefix=settings.pool_name_prefix,
            drain_seconds=settings.realtime_timeout,
            cooldown_seconds=int(settings.pool_scale_down_after),
            trigger_auth=settings.keda_rabbitmq_auth,
        )


def object_name(prefix: str, endpoint: str) -> str:
    """A DNS-1123 name for the endpoint's objects (endpoint names may hold capitals): lowercased,
    with a short hash of the real name when lowering changed it, at most 63 characters."""
    name = f"{prefix}pool-{endpoint}".lower()
    name = re.sub(r"[^a-z0-9-]", "-", name).strip("-")
    if name != f"{prefix}pool-{endpoint}":
        name = f"{name[:54]}-{hashlib.sha256(endpoint.encode()).hexdigest()[:8]}"
    return name[:63].rstrip("-")


def labels(endpoint: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "esd-inference-worker",
        "app.kubernetes.io/part-of": "esd",
        POOL_LABEL: endpoint,
    }


def deployment(spec: PoolSpec, config: KubernetesPoolConfig) -> dict[str, Any]:
    """The pool's Deployment: workers of the image with the deployment's settings, the instance
    type's GPUs, resources and node labels."""
    placement = spec.placement
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if placement.cpus:
        requests["cpu"] = f"{placement.cpus:g}"
    if placement.memory:
        requests["memory"] = limits["memory"] = placement.memory
    if placement.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(placement.gpus)
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": int(config.drain_seconds + STOP_MARGIN_SECONDS),
        "containers": [
            {
                "name": "worker",
                "image": config.image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["esd-inference-worker", "--endpoint", spec.name],
                "envFrom": [{"configMapRef": {"name": config.config_map}}, {"secretRef": {"name": config.secret}}],
                "env": [{"name": "ESD_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                # Prometheus metrics: ESD_METRICS_PORT comes from the config map, as for every pod
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                "resources": {key: value for key, value in (("requests", requests), ("limits", limits)) if value},
                # alive while the worker process runs; readiness is its heartbeat, read by the service
                "livenessProbe": {"exec": {"command": ["esd-healthcheck"]}, "periodSeconds": 30, "timeoutSeconds": 10},
                "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
            }
        ],
    }
    if placement.node_labels:
        pod["nodeSelector"] = dict(placement.node_labels)
    if placement.gpus:
        # GPU nodes are commonly tainted so that only pods that need a GPU land there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    name = object_name(config.prefix, spec.name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels(spec.name)},
        "spec": {
            "replicas": spec.initial,
            "selector": {"matchLabels": {POOL_LABEL: spec.name}},
            "template": {"metadata": {"labels": labels(spec.name), "annotations": SCRAPE}, "spec": pod},
        },
    }


def scaled_object(spec: PoolSpec, config: KubernetesPoolConfig) -> dict[str, Any]:
    """KEDA's ScaledObject sizing the pool by its queue, messages held by workers included."""
    name = object_name(config.prefix, spec.name)
    return {
        "apiVersion": f"{KEDA_GROUP}/{KEDA_VERSION}",
        "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels(spec.name)},
        "spec": {
            "scaleTargetRef": {"name": name},
            "minReplicaCount": spec.minimum,
            "maxReplicaCount": spec.maximum,
            "pollingInterval": config.polling_seconds,
            "cooldownPeriod": config.cooldown_seconds,
            "triggers": [
                {
                    "type": "rabbitmq",
                    "metadata": {
                        # the management API counts unacknowledged messages: see the module's docstring
                        "protocol": "http",
                        "mode": "QueueLength",
                        "value": "1",  # one job per worker
                        "queueName": spec.queue,
                    },
                    "authenticationRef": {"name": config.trigger_auth},
                }
            ],
        },
    }


class KubernetesPool:
    """Sends the objects through the official async client; in the cluster it authenticates as
    the inference service's service account (deploy/kubernetes/rbac.yaml)."""

    scales_itself = True

    def __init__(self, config: KubernetesPoolConfig, api_client: Any = None) -> None:
        self.config = config
        self._api_client = api_client

    async def _client(self) -> Any:
        if self._api_client is None:
            from kubernetes_asyncio import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:  # outside a cluster: the operator's kubeconfig
                await config.load_kube_config()
            self._api_client = client.ApiClient()
        return self._api_client

    async def _apis(self) -> tuple[Any, Any]:
        from kubernetes_asyncio import client

        api_client = await self._client()
        return client.AppsV1Api(api_client), client.CustomObjectsApi(api_client)

    async def create(self, spec: PoolSpec) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        apps, custom = await self._apis()
        namespace = self.config.namespace
        body = deployment(spec, self.config)
        name = body["metadata"]["name"]
        try:
            await apps.create_namespaced_deployment(namespace, body)
        except ApiException as error:
            if error.status != 409:
                raise
            await apps.patch_namespaced_deployment(name, namespace, body)
        if spec.autoscaling:
            scaler = scaled_object(spec, self.config)
            try:
                await custom.create_namespaced_custom_object(
                    KEDA_GROUP, KEDA_VERSION, namespace, "scaledobjects", scaler
                )
            except ApiException as error:
                if error.status != 409:
                    raise
                await custom.patch_namespaced_custom_object(
                    KEDA_GROUP,
                    KEDA_VERSION,
                    namespace,
                    "scaledobjects",
                    name,
                    scaler,
                    # a custom object takes no strategic merge, and a JSON patch is a list
                    _content_type="application/merge-patch+json",
                )
        log.info("pool.deployment_created", endpoint=spec.name, deployment=name, keda=spec.autoscaling)

    async def scale(self, endpoint: str, count: int) -> None:
        """Only for endpoints without autoscaling (KEDA owns the others' replicas)."""
        apps, _ = await self._apis()
        name = object_name(self.config.prefix, endpoint)
        await apps.patch_namespaced_deployment_scale(name, self.config.namespace, {"spec": {"replicas": count}})

    async def count(self, endpoint: str) -> int:
        from kubernetes_asyncio.client.exceptions import ApiException

        apps, _ = await self._apis()
        try:
            scale = await apps.read_namespaced_deployment_scale(
                object_name(self.config.prefix, endpoint), self.config.namespace
            )
        except ApiException as error:
            if error.status == 404:
                return 0
            raise
        return scale.spec.replicas or 0

    async def stop(self, endpoint: str) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        apps, custom = await self._apis()
        name, namespace = object_name(self.config.prefix, endpoint), self.config.namespace
        for delete in (
            lambda: custom.delete_namespaced_custom_object(KEDA_GROUP, KEDA_VERSION, namespace, "scaledobjects", name),
            lambda: apps.delete_namespaced_deployment(name, namespace),
        ):
            try:
                await delete()
            except ApiException as error:
                if error.status != 404:
                    raise
        log.info("pool.deployment_deleted", endpoint=endpoint, deployment=name)

    async def close(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
