"""The platform on a real one-node Docker swarm: an endpoint on the `swarm` pool backend runs its
jobs; its pool grows from 0 to its maximum with the queue and returns to 0; a worker killed
mid-job and a scale-down during jobs each end with every job completed exactly once; and when
the inference-service replica that leads the autoscaler is killed, the other takes over.

"Completed exactly once" is read from two sides: the platform's events (one `inference.succeeded`
per job, no `inference.failed`) and the workers' own logs, dead containers' included (one
`worker.job_done` per job: no job ran to its end twice)."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections import Counter
from datetime import datetime

import httpx
import pytest

from deploy.local.events import EventListener
from tests.support import wait_for
from tests.swarm.conftest import FIGURES, STACK, say

pytestmark = pytest.mark.swarm

MAX_WORKERS = 3
# long enough to be caught mid-job (several seconds a job here); 150 is the most a job may ask
STEPS = 150


class Api:
    def __init__(self, stack) -> None:
        self.http = httpx.Client(base_url=stack.gateway_url, timeout=60)
        self.key = stack.api_key

    def __call__(self, method: str, path: str, *, json=None) -> httpx.Response:
        return self.http.request(method, path, headers={"x-api-key": self.key, "username": "admin"}, json=json)


class Events:
    """Every `inference.*` event, gathered from a queue of the test's own."""

    def __init__(self, listener: EventListener) -> None:
        self.listener = listener
        self.seen: list[tuple[str, dict]] = []

    def poll(self) -> list[tuple[str, dict]]:
        while True:
            try:
                self.seen.append(self.listener.received.get_nowait())
            except queue.Empty:
                return self.seen

    def of(self, key: str, jobs: list[str]) -> Counter:
        """How many times each job had the event; an event relayed twice (the same id, as
        at-least-once delivery allows and consumers drop) counts once."""
        wanted = set(jobs)
        distinct = {(body["inference_id"], body["id"]) for k, body in self.poll() if k == key}
        return Counter(job for job, _ in distinct if job in wanted)


@pytest.fixture(scope="module")
def api(swarm_stack) -> Api:
    return Api(swarm_stack)


@pytest.fixture(scope="module")
def events(swarm_stack):
    with EventListener(swarm_stack.servers.amqp_url, f"{swarm_stack.prefix}esd.events", "inference.*") as listener:
        yield Events(listener)


@pytest.fixture(scope="module")
def figures():
    return FIGURES


@pytest.fixture(scope="module")
def model(api, tmp_path_factory) -> str:
    from diffusion.testing import make_tiny_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    make_tiny_checkpoint(path, seed=0)
    name = f"{uuid.uuid4().hex[:6]}-tiny.safetensors"
    created = api(
        "POST",
        "/checkpoints",
        json={"checkpoint_type": "Stable-diffusion", "filenames": [{"filename": name, "parts_number": 1}]},
    ).json()["data"]
    etag = httpx.put(created["s3PresignUrl"][name][0], content=path.read_bytes()).headers["etag"]
    response = api(
        "PUT",
        f"/checkpoints/{created['checkpoint']['id']}",
        json={"status": "Active", "multi_parts_tags": {name: [{"ETag": etag, "PartNumber": 1}]}},
    )
    assert response.status_code == 200, response.text
    return name


@pytest.fixture(scope="module")
def endpoint(api, swarm_stack, model) -> str:
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": f"sw{uuid.uuid4().hex[:6]}",
            "endpoint_type": "Async",
            "instance_type": "ml.g5.2xlarge",  # ESD's name; no table configured: any name runs here
            "initial_instance_count": 1,
            "autoscaling_enabled": True,
            "min_instance_number": 0,
            "max_instance_number": MAX_WORKERS,
            "assign_to_roles": ["IT Operator"],
        },
    )
    assert response.status_code == 202, response.text
    name = response.json()["data"]["endpoint_name"]
    service = swarm_stack.pool(name)  # one swarm service per endpoint, made by the inference service
    assert service.attrs["Spec"]["Labels"]["esd.pool"] == name
    wait_for(lambda: status(api, name)["endpoint_status"] == "InService", timeout=300, what="InService")
    yield name
    assert api("DELETE", "/endpoints", json={"endpoint_name_list": [name]}).status_code == 204
    wait_for(lambda: not swarm_stack.docker_client.services.list(filters={"name": service.name}), what="pool removed")


def status(api, name: str) -> dict:
    for endpoint in api("GET", "/endpoints").json()["data"]["endpoints"]:
        if endpoint["endpoint_name"] == name:
            return endpoint
    raise AssertionError(f"endpoint {name} is gone")


def replicas(stack, name: str) -> int:
    service = stack.pool(name)
    service.reload()
    return service.attrs["Spec"]["Mode"]["Replicated"]["Replicas"]


def live_workers(api, name: str) -> int:
    return int(status(api, name)["current_instance_count"])


def pool_is_empty(api, stack, name: str) -> bool:
    return replicas(stack, name) == 0 and live_workers(api, name) == 0


def submit(api, endpoint: str, model: str, count: int, steps: int = STEPS) -> list[str]:
    jobs = []
    for number in range(count):
        body = {
            "prompt": "a tiny red cube",
            "steps": steps,
            "sampler_name": "Euler",
            "width": 128,
            "height": 128,
            "batch_size": 2,
            "seed": number,
        }
        created = api(
            "POST",
            "/inferences",
            json={
                "task_type": "txt2img",
                "inference_type": "Async",
                "models": {"Stable-diffusion": [model]},
                "sagemaker_endpoint_name": endpoint,
                "payload_string": json.dumps(body),
            },
        )
        assert created.status_code == 202, created.text  # with its payload, a job starts at once
        jobs.append(created.json()["data"]["inference"]["inference_id"])
    return jobs


def finished(api, jobs: list[str]) -> dict[str, str]:
    statuses = {job: api("GET", f"/inferences/{job}").json()["data"]["status"] for job in jobs}
    return statuses if all(s in ("succeed", "failed") for s in statuses.values()) else {}


def runs_completed(stack, endpoint: str, jobs: list[str]) -> Counter:
    """How many times each job ran to its end, from every worker container's log (the dead ones
    too: a killed or scaled-down container stays until the swarm is gone)."""
    wanted = set(jobs)
    lines = stack.log_events(**{"esd.pool": endpoint})
    return Counter(
        line["inference_id"]
        for line in lines
        if line.get("event") == "worker.job_done" and line.get("inference_id") in wanted
    )


def check_each_completed_once(api, stack, events, endpoint: str, jobs: list[str]) -> None:
    statuses = wait_for(lambda: finished(api, jobs), timeout=600, interval=1, what="the jobs")
    assert set(statuses.values()) == {"succeed"}, statuses
    wait_for(lambda: len(events.of("inference.succeeded", jobs)) == len(jobs), timeout=30, what="the events")
    assert events.of("inference.succeeded", jobs) == Counter(jobs)
    assert not events.of("inference.failed", jobs)
    assert runs_completed(stack, endpoint, jobs) == Counter(jobs)


def test_jobs_succeed_and_the_pool_grows_to_its_maximum_with_the_queue_and_returns_to_zero(
    api, swarm_stack, events, endpoint, model, figures
):
    wait_for(lambda: pool_is_empty(api, swarm_stack, endpoint), timeout=120, what="an idle pool at 0")
    submitted = time.monotonic()
    jobs = submit(api, endpoint, model, count=3 * MAX_WORKERS)
    wait_for(lambda: live_workers(api, endpoint) == MAX_WORKERS, timeout=300, interval=0.5, what="a full pool")
    grown = time.monotonic() - submitted
    assert replicas(swarm_stack, endpoint) == MAX_WORKERS  # never more than the maximum
    check_each_completed_once(api, swarm_stack, events, endpoint, jobs)
    done = time.monotonic()
    wait_for(lambda: pool_is_empty(api, swarm_stack, endpoint), timeout=180, interval=0.5, what="the pool at 0")
    shrunk = time.monotonic() - done
    workers = Counter(body["worker_id"] for key, body in events.poll() if key == "inference.started")
    assert len(workers) >= MAX_WORKERS  # the work was shared
    figures["pool 0 -> max"] = f"{MAX_WORKERS} workers in service {grown:.1f} s after {len(jobs)} jobs were started"
    figures["pool back to 0"] = f"{shrunk:.1f} s after the last job (idle time allowed: 3 s)"
    figures["jobs (growth)"] = f"{len(jobs)} completed / {len(jobs)} submitted"


def test_a_worker_killed_mid_job_leaves_its_job_to_another_and_every_job_completes_once(
    api, swarm_stack, events, endpoint, model, figures
):
    jobs = submit(api, endpoint, model, count=4)

    def a_job_running():
        started = [body for key, body in events.poll() if key == "inference.started" and body["inference_id"] in jobs]
        return started[0] if started else None

    victim = wait_for(a_job_running, timeout=300, interval=0.2, what="a job to start")
    # a swarm worker is named after its task
    (container,) = swarm_stack.containers(**{"com.docker.swarm.task.name": victim["worker_id"]})
    container.kill()  # SIGKILL: no drain, no report
    say(f"killed worker {victim['worker_id']} running {victim['inference_id']}")
    check_each_completed_once(api, swarm_stack, events, endpoint, jobs)
    assert events.of("inference.started", jobs)[victim["inference_id"]] == 2  # taken again, done once
    figures["jobs (worker killed mid-job)"] = f"{len(jobs)} completed once / {len(jobs)} submitted"


def test_a_scale_down_during_jobs_lets_the_stopping_worker_finish_its_job(
    api, swarm_stack, events, endpoint, model, figures
):
    jobs = submit(api, endpoint, model, count=3 * MAX_WORKERS)

    def busy_workers():
        running = {body["worker_id"] for key, body in events.poll() if key == "inference.started"}
        return len(running) >= 2 and replicas(swarm_stack, endpoint) >= 2 and live_workers(api, endpoint) >= 2

    wait_for(busy_workers, timeout=300, interval=0.3, what="two busy workers")
    before = replicas(swarm_stack, endpoint)
    swarm_stack.pool(endpoint).scale(before - 1)  # swarm stops one worker with SIGTERM and a grace period
    say(f"scaled the pool from {before} to {before - 1} during its jobs")
    check_each_completed_once(api, swarm_stack, events, endpoint, jobs)
    assert events.of("inference.started", jobs) == Counter(jobs)  # none was run again
    lines = swarm_stack.log_events(**{"esd.pool": endpoint})
    drained = [line for line in lines if line.get("event") == "worker.stopping" and line.get("job_in_hand")]
    assert drained, "the stopped worker held a job"
    assert not [line for line in lines if line.get("event") == "worker.job_given_back"]
    figures["jobs (scale-down during jobs)"] = f"{len(jobs)} completed once / {len(jobs)} submitted"


def test_when_the_leading_inference_replica_dies_another_takes_over_the_autoscaling(
    api, swarm_stack, events, endpoint, model, figures
):
    inference = {"com.docker.swarm.service.name": f"{STACK}_inference"}

    def leader():
        holders = {}
        for container in swarm_stack.containers(**inference):
            container.reload()
            if container.status != "running":
                continue
            for line in swarm_stack.log_events(**{**inference, "com.docker.swarm.task.id": _task_id(container)}):
                if line.get("event") in ("leader.acquired", "leader.lost", "leader.released"):
                    holders[container.id] = line["event"] == "leader.acquired"
        leading = [cid for cid, held in holders.items() if held]
        return leading[0] if len(leading) == 1 else None

    leading = wait_for(leader, timeout=60, what="one leader")
    wait_for(lambda: pool_is_empty(api, swarm_stack, endpoint), timeout=180, what="an idle pool at 0")
    swarm_stack.docker_client.containers.get(leading).kill()
    killed = time.time()
    say(f"killed the leading inference replica {leading[:12]}")

    def taken_over():
        for container in swarm_stack.containers(**inference):
            if container.id == leading:
                continue
            for line in swarm_stack.log_events(**{**inference, "com.docker.swarm.task.id": _task_id(container)}):
                if line.get("event") == "leader.acquired":
                    at = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
                    if at > killed:
                        return at
        return None

    took_over = wait_for(taken_over, timeout=60, interval=0.5, what="another replica to lead")
    # the new leader sizes the pool: from 0 to work and back
    jobs = submit(api, endpoint, model, count=2, steps=20)
    check_each_completed_once(api, swarm_stack, events, endpoint, jobs)
    figures["leader takeover"] = f"{took_over - killed:.1f} s after the leader was killed (lease: 6 s)"
    figures["jobs (after takeover)"] = f"{len(jobs)} completed / {len(jobs)} submitted"


def _task_id(container) -> str:
    return container.labels["com.docker.swarm.task.id"]


def test_the_production_stack_files_make_the_services_they_describe(swarm_stack):
    """stack.yml with servers.yml and publish.yml, as the README deploys them on an overlay
    network: every service is made as described (no replica is started: the servers' images
    and nodes labelled for their data are not here)."""
    import os

    from tests.swarm.dockerhost import REPO_ROOT, docker

    name, network = "esdprod", "esd-prod-net"
    secret = REPO_ROOT / "deploy" / "swarm" / "s3.json"
    created_secret = not secret.exists()
    if created_secret:
        secret.write_text(json.dumps({"identities": []}))
    env = {
        **os.environ,
        "ESD_NETWORK": network,
        "ESD_IMAGE": swarm_stack.env["ESD_IMAGE"],
        "ESD_API_KEY": "k",
        "ESD_ADMIN_PASSWORD": "p",
        "ESD_WEBHOOK_SECRET": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0",
        "ESD_S3_ACCESS_KEY": "a",
        "ESD_S3_SECRET_KEY": "s",
        **{key: "0" for key in ("ESD_GATEWAY_REPLICAS", "ESD_SERVICE_REPLICAS", "ESD_INFERENCE_REPLICAS")},
        "ESD_TRAINING_WORKER_REPLICAS": "0",
    }
    files = [arg for file in ("stack.yml", "servers.yml", "publish.yml") for arg in ("-c", f"deploy/swarm/{file}")]
    try:
        docker("network", "create", "--driver", "overlay", "--attachable", network)
        docker("stack", "deploy", "--resolve-image", "never", *files, name, env=env, cwd=REPO_ROOT)
        services = {
            service.name.removeprefix(f"{name}_"): service.attrs["Spec"]
            for service in swarm_stack.docker_client.services.list(
                filters={"label": f"com.docker.stack.namespace={name}"}
            )
        }
        assert set(services) == {
            "gateway", "identity", "checkpoint", "inference", "training", "webhooks", "training-worker", "rabbitmq", "mongo", "s3",
        }  # fmt: skip
        assert services["gateway"]["EndpointSpec"]["Ports"][0]["PublishedPort"] == 8080
        inference = services["inference"]["TaskTemplate"]["ContainerSpec"]
        assert "ESD_POOL_BACKEND=swarm" in inference["Env"]
        assert [m["Target"] for m in inference["Mounts"]] == ["/var/run/docker.sock"]
        assert services["inference"]["TaskTemplate"]["Placement"]["Constraints"] == ["node.role == manager"]
        for server in ("rabbitmq", "mongo", "s3"):
            spec = services[server]["TaskTemplate"]
            assert spec["ContainerSpec"]["Mounts"][0]["Type"] == "volume"
            assert spec["Placement"]["Constraints"] == ["node.labels.esd.data == true"]
        networks = {n["Target"] for n in services["gateway"]["TaskTemplate"]["Networks"]}
        assert len(networks) == 1
    finally:
        docker("stack", "rm", name, check=False)
        if created_secret:
            secret.unlink(missing_ok=True)
        for _ in range(30):
            if docker("network", "rm", network, check=False).returncode == 0:
                break
            time.sleep(1)
