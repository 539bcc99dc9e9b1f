"""The `kubernetes` pool backend through the official async client, against an in-process
stand-in of the Kubernetes API on loopback that keeps the objects it is sent: what the backend
creates for an endpoint, how it updates objects that exist, sizes a fixed pool, and deletes
everything of an endpoint. (No cluster runs here; the objects' validity is
tests/unit/test_kubernetes.py's.)"""

from __future__ import annotations

import pytest
from aiohttp import web

from shared.instance_types import InstanceType
from shared.pools import PoolSpec
from shared.pools.kubernetes import KubernetesPool, KubernetesPoolConfig

pytestmark = pytest.mark.asyncio(loop_scope="session")

DEPLOYMENTS = "/apis/apps/v1/namespaces/esd/deployments"
SCALED_OBJECTS = "/apis/keda.sh/v1alpha1/namespaces/esd/scaledobjects"


class FakeApi:
    """Deployments and ScaledObjects of one namespace: create (409 when it exists), patch, get
    and patch the scale, delete (404 when absent)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[str] = []
        app = web.Application()
        for collection in (DEPLOYMENTS, SCALED_OBJECTS):
            app.router.add_post(collection, self.create)
            app.router.add_patch(collection + "/{name}", self.patch)
            app.router.add_delete(collection + "/{name}", self.delete)
        app.router.add_get(DEPLOYMENTS + "/{name}/scale", self.get_scale)
        app.router.add_patch(DEPLOYMENTS + "/{name}/scale", self.patch_scale)
        self.app = app

    def _key(self, request: web.Request) -> tuple[str, str]:
        collection = DEPLOYMENTS if request.path.startswith(DEPLOYMENTS) else SCALED_OBJECTS
        return collection, request.match_info["name"]

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = (request.path, body["metadata"]["name"])
        self.calls.append(f"create {body['kind']} {key[1]}")
        if key in self.objects:
            return web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status=409)
        self.objects[key] = body
        return web.json_response(body, status=201)

    async def patch(self, request: web.Request) -> web.Response:
        key = self._key(request)
        # as the API server: an object is a merge patch (custom objects take no strategic one)
        allowed = {"application/merge-patch+json"}
        if key[0] == DEPLOYMENTS:
            allowed.add("application/strategic-merge-patch+json")
        if request.content_type not in allowed:
            return web.json_response({"kind": "Status", "code": 415}, status=415)
        self.calls.append(f"patch {key[1]}")
        self.objects[key] = await request.json()
        return web.json_response(self.objects[key])

    async def delete(self, request: web.Request) -> web.Response:
        key = self._key(request)
        self.calls.append(f"delete {key[1]}")
        if self.objects.pop(key, None) is None:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response({"kind": "Status", "status": "Success"})

    def _scale(self, name: str) -> dict:
        deployment = self.objects[(DEPLOYMENTS, name)]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": "esd"},
            "spec": {"replicas": deployment["spec"]["replicas"]},
        }

    async def get_scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if (DEPLOYMENTS, name) not in self.objects:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        return web.json_response(self._scale(name))

    async def patch_scale(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.calls.append(f"scale {name}")
        self.objects[(DEPLOYMENTS, name)]["spec"]["replicas"] = (await request.json())["spec"]["replicas"]
        return web.json_response(self._scale(name))


@pytest.fixture
async def cluster():
    from kubernetes_asyncio import client

    fake = FakeApi()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
    pool = KubernetesPool(
        KubernetesPoolConfig(namespace="esd", image="esd-platform:1"), client.ApiClient(configuration)
    )
    yield fake, pool
    await pool.close()
    await runner.cleanup()


def pool_spec(name: str, *, autoscaling: bool) -> PoolSpec:
    return PoolSpec(
        name=name,
        queue=f"inference.{name}",
        instance_type="ml.g5.2xlarge",
        placement=InstanceType(gpus=1),
        minimum=0,
        maximum=4,
        initial=1,
        autoscaling=autoscaling,
    )


async def test_an_autoscaled_endpoint_is_a_deployment_and_a_scaled_object_and_deleting_it_removes_both(cluster):
    fake, pool = cluster
    assert pool.scales_itself
    await pool.create(pool_spec("esd-async-a", autoscaling=True))
    name = "esd-pool-esd-async-a"
    deployment = fake.objects[(DEPLOYMENTS, name)]
    scaler = fake.objects[(SCALED_OBJECTS, name)]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert scaler["spec"]["triggers"][0]["metadata"]["protocol"] == "http"
    assert await pool.count("esd-async-a") == 1

    await pool.create(pool_spec("esd-async-a", autoscaling=True))  # again (another replica): updated
    assert fake.calls[-2:] == [f"create ScaledObject {name}", f"patch {name}"]

    await pool.stop("esd-async-a")
    assert fake.objects == {}
    assert await pool.count("esd-async-a") == 0
    await pool.stop("esd-async-a")  # gone already: nothing to do


async def test_a_fixed_endpoint_has_no_scaled_object_and_is_sized_by_hand(cluster):
    fake, pool = cluster
    await pool.create(pool_spec("esd-real-time-f", autoscaling=False))
    assert [key for key in fake.objects if key[0] == SCALED_OBJECTS] == []
    await pool.scale("esd-real-time-f", 3)
    assert await pool.count("esd-real-time-f") == 3
