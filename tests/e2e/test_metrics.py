"""Prometheus metrics of every process of a running stack: each serves /metrics where its
`<var>/metrics/<process>.json` says, and after a job, a second job on the same model, a
webhook and a training, the series each process owns have moved."""

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_inference import payload, tiny_models, unique, wait_endpoint  # noqa: F401
from tests.e2e.test_job_control import finished
from tests.e2e.test_training import base_model, make_dataset  # noqa: F401
from tests.support import wait_for

pytestmark = pytest.mark.e2e

SERVICES = ("gateway", "identity", "checkpoint", "inference", "training", "webhooks")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page by (name, labels)."""
    text = httpx.get(url, timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value, summed over the labels not named (0 when absent)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


class Receiver:
    """A webhook receiver answering 204."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def metrics_endpoint(api, tiny_models):  # noqa: F811
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("metrics")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "autoscaling_enabled": False,
            "assign_to_roles": ["IT Operator"],
        },
    )
    name = response.json()["data"]["endpoint_name"]
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


def worker_of(stack, pool: str) -> str:
    """The /metrics URL of a worker of `pool` (workers say where theirs are when they are ready)."""
    return wait_for(
        lambda: next((url for name, url in stack.metrics_urls().items() if name.startswith(f"worker-{pool}-")), None),
        timeout=60,
        what=f"a worker of {pool} to serve metrics",
    )


def test_every_process_serves_metrics_and_its_series_move_after_jobs(
    api,
    stack,
    tiny_models,  # noqa: F811
    base_model,  # noqa: F811
    metrics_endpoint,
):
    urls = stack.metrics_urls()
    assert set(SERVICES) <= set(urls), urls
    urls["inference-worker"] = worker_of(stack, metrics_endpoint)
    urls["training-worker"] = worker_of(stack, "training")
    before = {name: scrape(url) for name, url in urls.items()}

    user = api("POST", "/users", json={"username": unique("metrics"), "password": "pw", "roles": ["IT Operator"]})
    assert user.status_code == 201, user.text
    receiver = Receiver()
    jobs = []
    for seed in (1, 2):  # the second finds the model loaded: a cache hit
        response = api(
            "POST",
            "/inferences",
            json={
                "task_type": "txt2img",
                "inference_type": "Async",
                "models": {"Stable-diffusion": [tiny_models["model"]]},
                "sagemaker_endpoint_name": metrics_endpoint,
                "payload_string": json.dumps(payload(steps=3, batch_size=2, seed=seed)),
                "webhook": receiver.url,
                "webhook_events_filter": ["completed"],
            },
        )
        assert response.status_code == 202, response.text
        jobs.append(response.json()["data"]["inference"]["inference_id"])
        assert finished(api, jobs[-1])["status"] == "succeed"
    dataset = f"{uuid.uuid4().hex[:6]}-metrics"
    make_dataset(api, dataset, count=2)
    training = api(
        "POST",
        "/trainings",
        json={
            "lora_train_type": "kohya",
            "params": {
                "training_params": {"fm_type": "sd_1_5", "model": base_model, "dataset": dataset},
                "config_params": {"training": {"max_train_epochs": 1, "resolution": 64, "network_dim": 4}},
            },
        },
    )
    training_id = training.json()["data"]["id"]
    wait_for(
        lambda: api("GET", f"/trainings/{training_id}").json()["data"]["job_status"] in ("Completed", "Failed"),
        timeout=180,
        what="the training",
    )
    wait_for(lambda: len(receiver.bodies) >= 2, timeout=30, what="the webhooks")
    after = {name: scrape(url) for name, url in urls.items()}

    def moved(process: str, name: str, **labels: str) -> float:
        return value(after[process], name, **labels) - value(before[process], name, **labels)

    # HTTP latency by route and status
    assert moved("gateway", "esd_http_request_duration_seconds_count", route="/inferences", status="202") == 2
    assert moved("gateway", "esd_http_request_duration_seconds_count", route="/inferences/{inference_id}") >= 2
    # RPC latency by command: asked by the gateway, answered by the services
    assert moved("gateway", "esd_rpc_call_duration_seconds_count", command="inference.create_inference") == 2
    assert moved("inference", "esd_rpc_handle_duration_seconds_count", command="inference.create_inference") == 2
    assert moved("training", "esd_rpc_handle_duration_seconds_count", command="training.create_training") == 1
    assert moved("checkpoint", "esd_rpc_handle_duration_seconds_count", command="checkpoint.register_checkpoint") >= 1
    assert moved("identity", "esd_rpc_handle_duration_seconds_count", command="identity.create_user") == 1
    # jobs by status
    assert moved("inference", "esd_jobs_total", kind="inference", status="succeed") == 2
    assert moved("training", "esd_jobs_total", kind="training", status="Completed") == 1
    # queue depth and pool size per endpoint
    assert value(after["inference"], "esd_pool_workers", endpoint=metrics_endpoint) == 1
    assert ("esd_queue_depth", frozenset({("endpoint", metrics_endpoint)})) in after["inference"]
    # time per step and per image; model load time and cache hits
    worker = "inference-worker"
    assert moved(worker, "esd_inference_step_seconds_count", endpoint=metrics_endpoint) == 2 * 2  # steps 2 and 3
    assert moved(worker, "esd_inference_image_seconds_count", endpoint=metrics_endpoint) == 2 * 2  # two images each
    assert value(after[worker], "esd_model_load_seconds_count", kind="checkpoint") >= 1
    assert moved(worker, "esd_model_cache_requests_total", cache="memory", result="hit") >= 1
    # training step time and loss
    assert moved("training-worker", "esd_training_step_seconds_count", pool="training") >= 1
    assert value(after["training-worker"], "esd_training_loss", pool="training") > 0
    # webhooks delivered
    assert moved("webhooks", "esd_webhook_deliveries_total", outcome="delivered") >= 2
